"""The OpenAI client that alpaca_eval's annotators use to reach the judge (its client configs name
`openai_client` as their `client_class`), and the judge calls of one annotator run (JudgeSession).

A failing judge fails fast and cheaply, as MT-Bench's does (issue #28 §5): every request goes through the judge
client's `JudgeCalls` (an unusable answer is asked again at most twice, every answered call is in the spend,
UNUSABLE_LIMIT unusable answers in a row stop the job). alpaca_eval cannot leave one prompt out and go on, so a
judgment that stays unusable stops the job too; and as it saves its annotations only after a whole chunk, each
usable answer is also kept at once in `judge_responses.jsonl`: a rerun after a stop pays for none of them again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from mamba_align.eval.judge.client import JudgeCalls, JudgeError
from mamba_align.utils import ProgressLog, UserError, append_jsonl, read_jsonl


def openai_client(api_key_env: str = "OPENAI_API_KEY", **client_kwargs: Any):
    """The judge's OpenAI client, for alpaca_eval (as the `client_class` of the client config we write) and for
    our logprobs probe. The API key is read here, from the variable judge.api_key_env names, so it is in no file
    and not among the completion kwargs that alpaca_eval logs; local servers get a placeholder, as the client
    wants one. While an annotator runs, its `chat.completions.create` goes through the run's `JudgeSession`."""
    from mamba_align.eval.judge.client import openai_client as logged_client  # retries name URL, error and wait

    client = logged_client(client_kwargs.pop("base_url", None), os.environ.get(api_key_env, "").strip() or "EMPTY",
                           **client_kwargs)
    if _session is not None:
        _session.guard(client)
    return client


class JudgeSession:
    """The judge calls of one annotator run. alpaca_eval makes a client per prompt (and threads of its own), so
    what the calls share -- the JudgeCalls (re-asks, spend, stop), the answers kept so far, the progress line --
    lives here, and `openai_client` reaches it through the module's `_session`."""

    def __init__(self, calls: JudgeCalls, responses_path: Path, cache_path: Path):
        # cache_path: alpaca_eval's annotation cache, once the annotator config is chosen (for the stop's message)
        self.calls, self.path, self.cache_path = calls, responses_path, cache_path
        self.responses = {r["key"]: r["response"] for r in read_jsonl(responses_path, repair=True)}
        self.progress: ProgressLog | None = None
        self.lock = threading.Lock()

    def guard(self, client) -> None:
        completions = client.chat.completions
        raw_create = completions.with_raw_response.create  # taken before `create` is replaced (it would wrap ours)
        completions.create = lambda **request: self.create(raw_create, **request)

    def create(self, raw_create, **request):
        from openai.types.chat import ChatCompletion

        key = hashlib.sha256(json.dumps(request, sort_keys=True, default=str).encode()).hexdigest()
        kept = self.responses.get(key)
        if kept is not None:
            resp = ChatCompletion.model_validate(kept)
        else:
            try:
                resp = self.calls.ask(raw_create, **request)
            except JudgeError as e:  # alpaca_eval cannot leave one prompt out: the job ends here
                self.calls.stop(str(e))
                raise UserError(self.stopped()) from None
            row = {"key": key, "response": resp.model_dump(mode="json")}
            with self.lock:
                append_jsonl(self.path, row)
                self.responses[key] = row["response"]
        with self.lock:
            if self.progress is not None:
                self.progress.update()
        return resp

    def stopped(self) -> str:
        return (f"judging stopped: {self.calls.stopped}. The {len(self.responses)} answers obtained are kept in "
                f"{self.path} (and {self.cache_path}), and a rerun sends only the rest ({self.calls.spend()})")


_session: JudgeSession | None = None  # the annotator run in progress, for the clients alpaca_eval makes


@contextlib.contextmanager
def judge_session(calls: JudgeCalls, work_dir: Path):
    global _session
    _session = JudgeSession(calls, work_dir / "judge_responses.jsonl", work_dir)
    try:
        yield _session
    finally:
        _session = None

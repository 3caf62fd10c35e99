"""The one judge interface: OpenAI chat completions, against the real API or our local judge server.

`JudgeClient.complete_many` sends every request that is not already in the JSONL cache, with
bounded concurrency, and appends each finished judgment to the cache at once (fsync). A rerun after
a crash therefore sends only what is missing. Failed calls are never cached. The API key is read
from the environment and never written anywhere.

Retries are the openai client's own (`max_retries`: 408, 409, 429, 5xx, timeouts and connection
errors, with jittered exponential backoff, Retry-After honoured); each is logged with the URL, the
error and the wait. Only an answer the client cannot read (a body that is not JSON, no choices, no
message content) is ours to handle. Such an answer is billed all the same, so it is asked again at
most REASKS times per judgment, every answered call counts in the spend, and UNUSABLE_LIMIT unusable
answers in a row stop the run with the endpoint's own words: an endpoint that answers nothing
usable costs a handful of calls, not `max_retries` + 1 per judgment. `JudgeCalls` does this for both
judges: MT-Bench's `JudgeClient` and the client AlpacaEval's annotator gets (eval/alpacaeval.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor, as_completed
from pathlib import Path

from mamba_align.eval.judge.settings import JudgeSettings
from mamba_align.utils import ProgressLog, UserError, append_jsonl, read_jsonl

log = logging.getLogger(__name__)

# Request keys a caller may set per request; everything else comes from the judge config.
REQUEST_PARAMS = ("temperature", "max_tokens", "logprobs", "top_logprobs")

REASKS = 2  # asks again of one judgment whose answer could not be read (each ask is billed)
UNUSABLE_LIMIT = 5  # unusable answers in a row, over all requests, that stop the run
PROBE_TIMEOUT_S = 10.0  # the start-up check's GET {base_url}/models


def check_judge(judge: JudgeSettings | dict, environ=os.environ, local_exec: bool = True, probe: bool = False) -> None:
    """What judging needs, checked before any job runs: the settings' own checks (JudgeSettings: a known backend, an
    http(s) base_url, ...), and the environment's (`JudgeSettings.check_environment`: for the OpenAI backend a
    non-empty API key, for a local judge on CUDA jobs that run on this machine).

    With `probe`, also one cheap request to the endpoint (`probe_judge`), unless the judge job starts
    the local judge itself (backend local, no base_url)."""
    judge = JudgeSettings.from_params(judge)
    judge.check_environment(environ, local_exec)
    if probe and (judge.backend == "openai" or judge.base_url):
        probe_judge(judge.base_url, judge.api_key(environ), judge.api_key_env)


def probe_judge(base_url: str | None, key: str, key_env: str = "OPENAI_API_KEY") -> None:
    """One `GET {base_url}/models`: refuses an endpoint that does not answer, or refuses the key, before any
    job runs (a closed port was otherwise found after training, after minutes of silent retries). Any other
    answer means the server is there; not every OpenAI-compatible server lists its models."""
    import openai

    client = openai_client(base_url, key, max_retries=1, timeout=PROBE_TIMEOUT_S)
    where = f"GET {str(client.base_url).rstrip('/')}/models"
    try:
        client.models.list()
    except openai.APIConnectionError as e:  # refused, unresolvable, timed out
        raise UserError(f"the judge at judge.base_url {base_url or client.base_url} does not answer: {where} failed "
                        f"with {_cause(e)}; start the judge server or correct judge.base_url") from None
    except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
        raise UserError(f"the judge at {base_url or client.base_url} refused the API key in {key_env} "
                        f"(judge.api_key_env): {where}: HTTP {e.status_code}: {e.message}") from None
    except openai.APIStatusError as e:
        log.info("judge probe %s: HTTP %s (the server answers)", where, e.status_code)


def _cause(err: BaseException) -> str:
    """What went wrong under an openai error ('Connection error.' says nothing): the transport's error."""
    inner = err.__cause__ or err
    return f"{type(inner).__name__}: {inner}" if str(inner) else type(inner).__name__


def openai_client(base_url: str | None, key: str, **kwargs):
    """An openai.OpenAI client (`kwargs`: its other arguments) whose retries say what they wait for: the URL,
    the error and the wait, as a warning in the judge log (the client's own line, at INFO, names neither URL nor
    error). AlpacaEval's judge client is one too."""
    import sys

    from openai import OpenAI

    class LoggedRetries(OpenAI):
        # the client's retry hook (openai >= 1.6x); called inside its `except`, so the error is sys.exc_info()'s
        def _sleep_for_retry(self, *, retries_taken, max_retries, options, response):
            headers = response.headers if response is not None else None
            wait = self._calculate_retry_timeout(max_retries - retries_taken, options, headers)
            error = f"HTTP {response.status_code}" if response is not None else _cause(sys.exc_info()[1])
            log.warning("judge %s %s%s: %s; retry %d of %d in %.1f s", options.method.upper(),
                        str(self.base_url).rstrip("/"), options.url, error, retries_taken + 1, max_retries, wait)
            time.sleep(wait)

    return LoggedRetries(base_url=base_url, api_key=key, **kwargs)


class JudgeError(Exception):
    """One request failed for good (the client's retries exhausted, a non-retryable status, or no
    readable answer in `max_retries` + 1 tries)."""


class JudgeCalls:
    """Every call one judge job makes to its endpoint, from any number of threads and clients: `ask` sends one
    request, asks again (at most REASKS times) when the answer cannot be read, counts every answered call and its
    usage in the spend, and stops the job at UNUSABLE_LIMIT unusable answers in a row (`stopped` says why; every
    later `ask` raises JudgeError at once, without sending)."""

    def __init__(self, api_key: str = "", prices: tuple[float, float] | None = None):
        """`api_key`: kept out of error messages; `prices`: USD per million (prompt, completion) tokens."""
        self.prices = prices
        self.n_retries = 0  # repeated HTTP calls: the client's retries and our re-asks
        self.n_answered = 0  # calls answered with HTTP 2xx, usable or not: each is billed
        self.spent = {"prompt_tokens": 0, "completion_tokens": 0}  # the usage of every answered call
        self.stopped: str | None = None  # why the job stops, for the other workers
        self._unusable_run = 0  # unusable answers in a row
        self._api_key = api_key
        self._lock = threading.Lock()

    def ask(self, raw_create, **request):
        """`raw_create(**request)`: an openai client's `chat.completions.with_raw_response.create`. Returns the parsed
        answer; raises JudgeError when the job has stopped or the answer stayed unusable in REASKS + 1 asks. The
        openai client's own errors (its retries spent, a refused request) pass through."""
        for attempt in range(REASKS + 1):
            if self.stopped:
                raise JudgeError(self.stopped)
            raw = raw_create(**request)
            self._count_retries(raw.retries_taken + (attempt > 0))
            resp, error = self._read(raw)
            if error is None:
                return resp
            if attempt < REASKS and not self.stopped:
                log.warning("judge call: %s; asking again (%d/%d)", error, attempt + 1, REASKS)
        raise JudgeError(f"{error} (asked {REASKS + 1} times)")

    def stop(self, why: str) -> None:
        """Stop the job (the first reason stays): later asks send nothing."""
        with self._lock:
            if not self.stopped:
                self.stopped = why
                log.error("judge: %s", why)

    def spend(self) -> str:
        """Tokens (and dollars, when priced) of the answered calls so far, unusable answers included."""
        spent = self.spent
        text = f"spent {spent['prompt_tokens']:,} prompt + {spent['completion_tokens']:,} completion tokens"
        if self.prices:
            usd = (spent["prompt_tokens"] * self.prices[0] + spent["completion_tokens"] * self.prices[1]) / 1e6
            text += f" (${usd:,.2f})"
        return f"{text} in {self.n_answered} answered calls"

    def _read(self, raw) -> tuple[object, str | None]:
        """(the parsed answer, None), or (None, why it is unusable, in the endpoint's words); counts the call and
        its usage either way, and stops the job at UNUSABLE_LIMIT unusable answers in a row."""
        try:
            resp = raw.parse()
            choices = getattr(resp, "choices", None) or []
            content = choices[0].message.content if choices else None
            error = None if content is not None else "no choices" if not choices else "no message content"
        except (ValueError, TypeError, AttributeError) as e:  # ValueError: the body is not JSON
            resp, error = None, f"{type(e).__name__}: {e}"
        usage = getattr(resp, "usage", None)
        with self._lock:
            self.n_answered += 1
            for k in self.spent:
                self.spent[k] += int(getattr(usage, k, 0) or 0)
            self._unusable_run = 0 if error is None else self._unusable_run + 1
            if error is None:
                return resp, None
            body = raw.http_response.text
            error = self.redact(f"unusable answer from {raw.http_response.url} ({error}): "
                                f"{body[:300]}{'...' if len(body) > 300 else ''}")
            run = self._unusable_run
        if run >= UNUSABLE_LIMIT:
            self.stop(f"{UNUSABLE_LIMIT} unusable answers in a row; the last: {error}")
        return None, error

    def _count_retries(self, n: int) -> None:
        with self._lock:
            self.n_retries += n

    def redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if len(self._api_key) >= 8 else text


def request_key(model: str, messages: list[dict], params: dict, repeat: int) -> str:
    """Cache key: sha256 of the judge model, messages, sampling parameters and repeat index."""
    blob = json.dumps({"model": model, "messages": messages, "params": params, "repeat": repeat},
                      sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class JudgeClient:
    """Usage::

        with JudgeClient(JudgeSettings.from_config(config), "results/.../judge_cache.jsonl") as judge:
            results = judge.complete_many([{"messages": [...]}, ...])
        # results[i] is a list of `repeats` rows: {"content", "model_reported", "usage", ...}

    With backend "local" and no `base_url`, the local judge server is started on the first
    request that is not cached, and stopped when the `with` block ends.
    """

    def __init__(self, judge: JudgeSettings | dict, cache_path: str | os.PathLike, base_url: str | None = None,
                 *, prices: tuple[float, float] | None = None):
        """`judge`: the settings (or judge.* as a dict); `base_url` overrides theirs; `prices`: USD per million
        (prompt, completion) tokens, for the spend in the progress lines."""
        judge = JudgeSettings.from_params(judge)
        if judge.model is None:
            raise UserError("judge.model is null; MT-Bench's judge needs a model name")
        self.cfg = judge = dataclasses.replace(judge, base_url=base_url or judge.base_url)
        self.prices = prices
        self.model = judge.model
        self.backend = judge.backend
        self.base_url = judge.base_url
        check_judge(judge)
        self._api_key = judge.api_key()
        self.cache_path = Path(cache_path)
        self._cache: dict[str, dict] = {r["key"]: r for r in read_jsonl(self.cache_path, repair=True)}
        self._stack = contextlib.ExitStack()
        self.calls = JudgeCalls(self._api_key, prices)  # re-asks, the spend and the stop

    # what the calls of this object cost: n_retries (the client's retries and our re-asks), n_answered (calls
    # answered with HTTP 2xx, usable or not: each is billed) and spent (their usage)
    n_retries = property(lambda self: self.calls.n_retries)
    n_answered = property(lambda self: self.calls.n_answered)
    spent = property(lambda self: self.calls.spent)
    _stopped = property(lambda self: self.calls.stopped)

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> "JudgeClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def _endpoint(self) -> str | None:
        if self.base_url is None and self.backend == "local":
            from mamba_align.eval.judge.server import serve_local_judge

            local = dataclasses.asdict(self.cfg.local)
            self.base_url = self._stack.enter_context(serve_local_judge(local, self.model))
        return self.base_url

    # -- requests ----------------------------------------------------------------------------
    def params(self, request: dict) -> dict:
        """Sampling parameters sent with `request`: the config's, overridden per request."""
        params = {"temperature": self.cfg.temperature, "max_tokens": self.cfg.max_tokens}
        params.update({k: request[k] for k in REQUEST_PARAMS if k in request})
        return params

    def keys(self, request: dict) -> list[str]:
        params = self.params(request)
        return [request_key(self.model, request["messages"], params, r)
                for r in range(self.cfg.repeats)]

    def pending(self, requests: list[dict]) -> int:
        """How many calls `complete_many(requests)` would send (cache misses, de-duplicated)."""
        return len({k for req in requests for k in self.keys(req) if k not in self._cache})

    def complete_many(self, requests: list[dict]) -> list[list[dict]]:
        """Judge each request `repeats` times; return, per request, its list of cached result rows.

        A request is {"messages": [...]} plus optional overrides of REQUEST_PARAMS. Raises
        UserError after all other requests finished if some failed for good; those that
        succeeded stay in the cache for the rerun.
        """
        all_keys = [self.keys(req) for req in requests]
        todo: dict[str, dict] = {}
        for req, keys in zip(requests, all_keys):
            for repeat, key in enumerate(keys):
                if key not in self._cache:
                    todo[key] = dict(req, repeat=repeat)
        n_cached = sum(len(k) for k in all_keys) - len(todo)
        log.info("judge %s: %d calls to make, %d answered from cache %s",
                 self.model, len(todo), n_cached, self.cache_path)
        if todo:
            self._run(todo)
        return [[self._cache[k] for k in keys] for keys in all_keys]

    def _run(self, todo: dict[str, dict]) -> None:
        client = openai_client(self._endpoint(), self._api_key, **self.cfg.client_kwargs())
        failures: list[str] = []
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        pool = ThreadPoolExecutor(max_workers=self.cfg.concurrency)
        done = 0
        progress = ProgressLog(f"judge {self.model}", len(todo), logger=log,
                               extra=lambda: f"{self._spend()}, {self.n_retries} retries")
        try:
            with open(self.cache_path, "a", encoding="utf-8") as fh:
                futures = {pool.submit(self._complete_one, client, key, req): key
                           for key, req in todo.items()}
                for fut in as_completed(futures):
                    try:
                        row = fut.result()
                    except CancelledError:
                        continue
                    except JudgeError as e:
                        failures.append(str(e))
                        if self._stopped:  # the queued requests are not sent; those in flight still land
                            for f in futures:
                                f.cancel()
                        continue
                    append_jsonl(self.cache_path, row, fh=fh)
                    self._cache[row["key"]] = row
                    done += 1
                    progress.update()
        finally:
            # on Ctrl-C or a crash, do not start the queued requests
            pool.shutdown(wait=True, cancel_futures=True)
        if self._stopped:
            raise UserError(f"judging stopped: {self._stopped}. {done} of the {len(todo)} calls to make succeeded and "
                            f"are cached in {self.cache_path}, and a rerun sends only the rest ({self._spend()})")
        if failures:
            raise UserError(f"{len(failures)} of {len(todo)} judge calls failed; the {done} that "
                            f"succeeded are cached in {self.cache_path} and a rerun sends only the "
                            f"rest ({self._spend()}). First failure: {failures[0]}")

    def _spend(self) -> str:
        return self.calls.spend()

    def _complete_one(self, client, key: str, req: dict) -> dict:
        import openai

        try:
            resp = self.calls.ask(client.chat.completions.with_raw_response.create, model=self.model,
                                  messages=req["messages"], n=1, **self.params(req))
        except openai.APIStatusError as e:  # not retryable, or the client's retries are spent
            raise JudgeError(self._redact(f"HTTP {e.status_code}: {e.message}")) from None
        except openai.APIConnectionError as e:  # includes APITimeoutError
            raise JudgeError(self._redact(f"{_cause(e)} from {client.base_url} (after {self.cfg.max_retries} "
                                          f"retries)")) from None
        choice = resp.choices[0]
        return {
            "key": key,
            "repeat": req["repeat"],
            "model_requested": self.model,
            "model_reported": resp.model,
            "content": choice.message.content,
            "finish_reason": choice.finish_reason,
            "logprobs": choice.logprobs.model_dump(mode="json") if choice.logprobs else None,
            "usage": resp.usage.model_dump(mode="json", exclude_none=True) if resp.usage else None,
            "tstamp": time.time(),
        }

    def _redact(self, text: str) -> str:
        return self.calls.redact(text)

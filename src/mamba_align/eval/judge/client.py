"""The one judge interface: OpenAI chat completions, against the real API or our local judge server.

`JudgeClient.complete_many` sends every request that is not already in the JSONL cache, with
bounded concurrency, and appends each finished judgment to the cache at once (fsync). A rerun after
a crash therefore sends only what is missing. Failed calls are never cached. The API key is read
from the environment and never written anywhere.

Retries are the openai client's own (`max_retries`: 408, 409, 429, 5xx, timeouts and connection
errors, with jittered exponential backoff, Retry-After honoured). Only an answer the client cannot
read (a body that is not JSON, no message content) is ours to handle: it is asked again, within the
same `max_retries`, and is a failure of that request when none of the answers could be read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from mamba_align.utils import ProgressLog, UserError, append_jsonl, read_jsonl

log = logging.getLogger(__name__)

# Request keys a caller may set per request; everything else comes from the judge config.
REQUEST_PARAMS = ("temperature", "max_tokens", "logprobs", "top_logprobs")

URL = re.compile(r"https?://[^\s/:?#]+(:\d+)?(/\S*)?")


def judge_gpus(judge_cfg: dict) -> int:
    """GPUs a judge job holds: 1 where it starts the local judge on CUDA, else 0 (an API, or a judge
    server already running at judge.base_url, needs none)."""
    local = judge_cfg["backend"] == "local" and not judge_cfg.get("base_url")
    return int(local and str((judge_cfg.get("local") or {}).get("device") or "cpu").startswith("cuda"))


def check_judge(judge_cfg: dict, environ=os.environ, local_exec: bool = True) -> None:
    """What judging needs, checked before any job runs: a known backend, an http(s) base_url, for the
    OpenAI backend a non-empty API key in the environment (an empty one is as good as none), and, for a
    local judge on CUDA, jobs that run on this machine (`local_exec`: the judge rules are localrules, so
    on a cluster they run where snakemake runs, which is seldom a GPU node)."""
    if judge_cfg["backend"] not in ("openai", "local"):
        raise UserError(f"judge.backend is {judge_cfg['backend']!r}; expected 'openai' or 'local'")
    if judge_gpus(judge_cfg) and not local_exec:
        raise UserError(
            f"judge.local.device is {judge_cfg['local']['device']!r}, but the judge rules run where snakemake "
            f"runs (localrules), not on the cluster's GPU nodes; set judge.local.device: cpu, or serve the judge "
            f"model on a GPU node behind an OpenAI-compatible server (e.g. vLLM) and set judge.base_url to it")
    url = judge_cfg.get("base_url")
    if url is not None and not URL.fullmatch(str(url)):
        raise UserError(f"judge.base_url is {url!r}; expected an http(s) URL such as https://api.openai.com/v1 "
                        f"or http://localhost:8000/v1 (or null for api.openai.com)")
    env = judge_cfg.get("api_key_env") or "OPENAI_API_KEY"
    if judge_cfg["backend"] == "openai" and not environ.get(env, "").strip():
        raise UserError(f"judge.backend is 'openai' but the environment variable {env} (judge.api_key_env) is "
                        f"{'empty' if env in environ else 'not set'}; export it or use backend 'local'")


class JudgeError(Exception):
    """One request failed for good (the client's retries exhausted, a non-retryable status, or no
    readable answer in `max_retries` + 1 tries)."""


def request_key(model: str, messages: list[dict], params: dict, repeat: int) -> str:
    """Cache key: sha256 of the judge model, messages, sampling parameters and repeat index."""
    blob = json.dumps({"model": model, "messages": messages, "params": params, "repeat": repeat},
                      sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class JudgeClient:
    """Usage::

        with JudgeClient(judge_cfg, "results/.../judge_cache.jsonl") as judge:
            results = judge.complete_many([{"messages": [...]}, ...])
        # results[i] is a list of `repeats` rows: {"content", "model_reported", "usage", ...}

    With backend "local" and no `base_url`, the local judge server is started on the first
    request that is not cached, and stopped when the `with` block ends.
    """

    def __init__(self, judge_cfg: dict, cache_path: str | os.PathLike, base_url: str | None = None,
                 *, prices: tuple[float, float] | None = None):
        """`prices`: USD per million (prompt, completion) tokens, for the spend in the progress lines."""
        self.cfg = judge_cfg
        self.prices = prices
        self.model = judge_cfg["model"]
        self.backend = judge_cfg["backend"]
        self.base_url = base_url or judge_cfg.get("base_url")
        check_judge(dict(judge_cfg, base_url=self.base_url))
        if self.backend == "openai":
            self._api_key = os.environ[judge_cfg.get("api_key_env") or "OPENAI_API_KEY"].strip()
        else:
            self._api_key = "local-judge"  # our local server ignores it
        self.cache_path = Path(cache_path)
        self._cache: dict[str, dict] = {r["key"]: r for r in read_jsonl(self.cache_path, repair=True)}
        self._stack = contextlib.ExitStack()
        self.n_retries = 0  # repeated HTTP calls of this object: the client's retries and our re-asks
        self._count_lock = threading.Lock()

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

            self.base_url = self._stack.enter_context(serve_local_judge(self.cfg.get("local") or {}, self.model))
        return self.base_url

    # -- requests ----------------------------------------------------------------------------
    def params(self, request: dict) -> dict:
        """Sampling parameters sent with `request`: the config's, overridden per request."""
        params = {"temperature": self.cfg["temperature"], "max_tokens": self.cfg["max_tokens"]}
        params.update({k: request[k] for k in REQUEST_PARAMS if k in request})
        return params

    def keys(self, request: dict) -> list[str]:
        params = self.params(request)
        return [request_key(self.model, request["messages"], params, r)
                for r in range(self.cfg.get("repeats", 1))]

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
        from openai import OpenAI

        client = OpenAI(base_url=self._endpoint(), api_key=self._api_key, max_retries=int(self.cfg["max_retries"]),
                        timeout=float(self.cfg["timeout_s"]))
        failures: list[str] = []
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        pool = ThreadPoolExecutor(max_workers=int(self.cfg["concurrency"]))
        done = 0
        spent = {"prompt_tokens": 0, "completion_tokens": 0}
        progress = ProgressLog(f"judge {self.model}", len(todo), logger=log,
                               extra=lambda: f"{self._spend(spent)}, {self.n_retries} retries")
        try:
            with open(self.cache_path, "a", encoding="utf-8") as fh:
                futures = {pool.submit(self._complete_one, client, key, req): key
                           for key, req in todo.items()}
                for fut in as_completed(futures):
                    try:
                        row = fut.result()
                    except JudgeError as e:
                        failures.append(str(e))
                        continue
                    append_jsonl(self.cache_path, row, fh=fh)
                    self._cache[row["key"]] = row
                    done += 1
                    for k in spent:
                        spent[k] += int((row.get("usage") or {}).get(k) or 0)
                    progress.update()
        finally:
            # on Ctrl-C or a crash, do not start the queued requests
            pool.shutdown(wait=True, cancel_futures=True)
        if failures:
            raise UserError(f"{len(failures)} of {len(todo)} judge calls failed; the {done} that "
                            f"succeeded are cached in {self.cache_path} and a rerun sends only the "
                            f"rest. First failure: {failures[0]}")

    def _spend(self, spent: dict) -> str:
        """Tokens (and dollars, when priced) of this run's calls so far."""
        text = f"spent {spent['prompt_tokens']:,} prompt + {spent['completion_tokens']:,} completion tokens"
        if self.prices:
            usd = (spent["prompt_tokens"] * self.prices[0] + spent["completion_tokens"] * self.prices[1]) / 1e6
            text += f" (${usd:,.2f})"
        return text

    def _complete_one(self, client, key: str, req: dict) -> dict:
        import openai

        params = self.params(req)
        max_retries = int(self.cfg["max_retries"])
        for attempt in range(max_retries + 1):
            try:
                raw = client.chat.completions.with_raw_response.create(model=self.model, messages=req["messages"],
                                                                       n=1, **params)
            except openai.APIStatusError as e:  # not retryable, or the client's retries are spent
                raise JudgeError(self._redact(f"HTTP {e.status_code}: {e.message}")) from None
            except openai.APIConnectionError as e:  # includes APITimeoutError
                raise JudgeError(self._redact(f"{type(e).__name__}: {e} (after {max_retries} retries)")) from None
            self._count_retries(raw.retries_taken + (attempt > 0))
            try:
                resp = raw.parse()
                choice = resp.choices[0]
                if choice.message.content is None:
                    raise ValueError("the answer has no message content")
            except (ValueError, IndexError, AttributeError, TypeError) as e:  # ValueError: body is not JSON
                error = f"unparseable answer: {type(e).__name__}: {e}"
                if attempt < max_retries:
                    log.warning("judge call: %s; asking again (%d/%d)", self._redact(error), attempt + 1, max_retries)
                continue
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
        raise JudgeError(self._redact(f"{error} (asked {max_retries + 1} times)"))

    def _count_retries(self, n: int) -> None:
        with self._count_lock:
            self.n_retries += n

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if len(self._api_key) >= 8 else text


"""A fake OpenAI-compatible chat server for tests: stdlib only, 127.0.0.1, OS-chosen port, own thread.

    with FakeOpenAI(responder=lambda body: "Rating: [[7]]", faults={"429": 0.1}) as fake:
        client = OpenAI(base_url=fake.base_url, api_key="test")
        ...
        fake.bodies()       # every chat request body received, parsed, in arrival order
        fake.log            # one FakeRequest per chat request: body, raw bytes, fault, time
        fake.max_in_flight  # most requests answered at once (checks a client's concurrency)
        fake.tokens_sent    # usage totals of every answer sent back: what a real API would bill
        fake.gets           # paths of the GET requests (the models list)

The responder gets the parsed request body and returns the message content (str), or a dict
{"content": str, "logprobs": [entry, ...]} where entries are OpenAI's `logprobs.content` items;
`logprob_entry` builds one. Logprobs are only sent back when the request asked for them, and
`top_logprobs` is cut to the requested count.

Faults (chosen per request from a seeded RNG, in arrival order): "429" (with Retry-After),
"500", "timeout" (no answer for `hang_s`, then the connection is closed), "garbage"
(status 200 with a body that is not JSON), "empty" (status 200, no choices, but usage: billed,
as a gateway that lost the model's answer does), "400" (a request the server refuses, which no
retry can fix) and "no_content" (status 200, a choice whose message content is null, billed).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

# new kinds go last, so that a seed draws the same faults as before
FAULT_KINDS = ("429", "500", "timeout", "garbage", "empty", "400", "no_content")


def logprob_entry(token: str, top: dict[str, float]) -> dict:
    """One item of `choices[0].logprobs.content`: the sampled `token` and its alternatives.

    `top` maps token -> probability (not log); the sampled token's logprob is taken from it.
    """
    top_list = [{"token": t, "logprob": math.log(p), "bytes": list(t.encode())}
                for t, p in sorted(top.items(), key=lambda kv: -kv[1])]
    return {"token": token, "logprob": math.log(top[token]), "bytes": list(token.encode()),
            "top_logprobs": top_list}


@dataclasses.dataclass
class FakeRequest:
    path: str
    raw: bytes
    body: Any  # parsed JSON, or None if the request was not JSON
    headers: dict
    fault: str | None
    time: float


def default_responder(body: dict) -> str:
    return "A fake judgment. Rating: [[5]]"


class _Server(ThreadingHTTPServer):
    # socketserver listens with a backlog of 5, fewer than the clients' concurrency (8 in the judge tests):
    # when CPU load starves the accept loop, the kernel drops the connections beyond it, and the client's
    # connect times out (0.3 s, before the SYN is resent after 1 s) on a request this server never sees.
    # A real API server's backlog is hundreds.
    request_queue_size = 128
    daemon_threads = True


class FakeOpenAI:
    def __init__(self, responder: Callable[[dict], Any] = default_responder, *,
                 faults: dict[str, float] | None = None, seed: int = 0,
                 model: str = "fake-judge-0613", retry_after_s: float = 0.05,
                 hang_s: float = 2.0, delay_s: float = 0.0):
        unknown = set(faults or {}) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FAULT_KINDS}")
        self.responder = responder
        self.faults = dict(faults or {})
        self.model = model
        self.retry_after_s = retry_after_s
        self.hang_s = hang_s
        self.delay_s = delay_s  # added to every answer, to keep requests in flight
        self.log: list[FakeRequest] = []
        self.max_in_flight = 0  # most chat requests being answered at once
        self.tokens_sent = {"prompt_tokens": 0, "completion_tokens": 0}
        self.gets: list[str] = []
        self._in_flight = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "FakeOpenAI":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                fake.gets.append(self.path)
                if self.path.rstrip("/").endswith("/models"):
                    fake._send(self, 200, {"object": "list", "data": [
                        {"id": fake.model, "object": "model", "created": 0, "owned_by": "fake"}]})
                else:
                    fake._send(self, 404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self):
                fake._handle_post(self)

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # releases hanging "timeout" handlers
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeOpenAI":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._server is not None, "server not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    # -- what was received -------------------------------------------------------------------
    def bodies(self) -> list:
        """Parsed bodies of every chat-completions request, faulted ones included."""
        return [r.body for r in self.log]

    def answered_bodies(self) -> list:
        """Bodies of the requests that got a well-formed 200 answer."""
        return [r.body for r in self.log if r.fault is None]

    def reset(self) -> None:
        with self._lock:
            self.log.clear()

    # -- internals ---------------------------------------------------------------------------
    def _draw_fault(self) -> str | None:
        x = self._rng.random()
        for kind in FAULT_KINDS:
            x -= self.faults.get(kind, 0.0)
            if x < 0:
                return kind
        return None

    def _handle_post(self, h: BaseHTTPRequestHandler) -> None:
        raw = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not h.path.rstrip("/").endswith("/chat/completions"):
            self._send(h, 404, {"error": {"message": f"no route {h.path}"}})
            return
        with self._lock:
            fault = self._draw_fault()
            self.log.append(FakeRequest(h.path, raw, body, dict(h.headers), fault, time.time()))
            n = len(self.log)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            reply = self._reply(body, fault, n)
        finally:
            with self._lock:  # before answering, so the client's next request never overlaps it
                self._in_flight -= 1
        if reply is None:  # "timeout": no answer at all
            h.close_connection = True
            return
        status, data, headers = reply
        self._send(h, status, data, headers)

    def _reply(self, body, fault: str | None, n: int) -> tuple[int, dict | bytes, dict] | None:
        if self.delay_s:
            time.sleep(self.delay_s)
        if fault == "429":
            return 429, {"error": {"message": "Rate limit reached", "type": "requests"}}, {
                "Retry-After": f"{self.retry_after_s:g}"}
        if fault == "500":
            return 500, {"error": {"message": "The server had an error", "type": "server_error"}}, {}
        if fault == "timeout":
            self._stop.wait(self.hang_s)
            return None
        if fault == "garbage":
            return 200, b'{"id": "chatcmpl-garbage", "choices": [{"mess', {}
        if fault == "400":
            return 400, {"error": {"message": "Invalid value for 'max_tokens'", "type": "invalid_request_error"}}, {}
        if body is None or not isinstance(body.get("messages"), list):
            return 400, {"error": {"message": "body must be JSON with a 'messages' list",
                                   "type": "invalid_request_error"}}, {}
        if fault == "empty":
            return 200, dict(self._completion(body, n), choices=[]), {}
        if fault == "no_content":
            answer = self._completion(body, n)
            answer["choices"][0]["message"]["content"] = None
            return 200, answer, {}
        return 200, self._completion(body, n), {}

    def _completion(self, body: dict, n: int) -> dict:
        out = self.responder(body)
        content, logprobs = (out, None) if isinstance(out, str) else (out["content"], out.get("logprobs"))
        if body.get("logprobs") and logprobs is not None:
            k = int(body.get("top_logprobs") or 0)
            logprobs = {"content": [dict(e, top_logprobs=e.get("top_logprobs", [])[:k]) for e in logprobs]}
        else:
            logprobs = None
        prompt_words = sum(len(str(m.get("content", "")).split()) for m in body["messages"])
        completion_words = len(content.split())
        with self._lock:
            self.tokens_sent["prompt_tokens"] += prompt_words
            self.tokens_sent["completion_tokens"] += completion_words
        return {
            "id": f"chatcmpl-fake-{n}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "logprobs": logprobs, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_words, "completion_tokens": completion_words,
                      "total_tokens": prompt_words + completion_words},
        }

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, obj: dict | bytes, headers: dict | None = None) -> None:
        data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(data)
        except OSError:  # the client gave up (timed out) and closed the socket
            pass


# The judge settings and API key the judge tests use (the schema's judge section). timeout_s is 10 s, not shorter:
# on a loaded 2-CPU machine a 20 ms fake answer can take over 0.5 s, and the client's retry then breaks the tests
# that count requests exactly (tests of the timeout fault set their own short timeout_s).
KEY = "sk-test-secret-0123456789"


def judge_cfg(**overrides) -> dict:
    cfg = {"backend": "openai", "model": "gpt-4", "base_url": None, "api_key_env": "OPENAI_API_KEY",
           "concurrency": 8, "repeats": 1, "max_retries": 8, "timeout_s": 10, "temperature": 0.0,
           "max_tokens": 2048, "local": {"model_path": None, "gguf_package": None, "gguf_file": None,
                                          "rating_from_logprobs": False, "device": "cpu"}}
    cfg.update(overrides)
    return cfg

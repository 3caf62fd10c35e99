"""The portable generation engine: transformers' `generate` (CPU included)."""

from __future__ import annotations

from mamba_align.eval.engine.sampling import Sampling, cut_at_eos, stop_ids


class TransformersEngine:
    """transformers `generate`. Mamba has no attention mask in its recurrence, so a left-padded batch
    would leak pad tokens into the state: prompts are batched only with prompts of the same length."""

    name = "transformers"

    def __init__(self, model_dir: str, device: str | None = None, batch_size: int = 8, dtype=None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        kwargs = {}
        if self.device == "cpu":
            kwargs["use_mambapy"] = True  # parallel scan on CPU: much faster than the sequential loop
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if dtype is None:
            dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **kwargs)
        self._setup(model.to(self.device).eval(), batch_size)

    @classmethod
    def from_model(cls, model, tokenizer=None, batch_size: int = 8) -> TransformersEngine:
        """An engine around an already loaded transformers model (benchmarks and tests)."""
        import torch

        self = cls.__new__(cls)
        self.torch = torch
        self.device = str(next(model.parameters()).device)
        self.tokenizer = tokenizer
        self._setup(model.eval(), batch_size)
        return self

    def _setup(self, model, batch_size: int) -> None:
        self.model = model
        # one id or several (a ChatML model stops at <|im_end|> as well as at <|endoftext|>)
        self.eos_token_id = self.model.generation_config.eos_token_id
        tok_pad = getattr(self.tokenizer, "pad_token_id", None)
        stops = stop_ids(self.eos_token_id)
        self.pad_token_id = tok_pad if tok_pad is not None else (stops[0] if stops else 0)
        self.batch_size = batch_size

    def generate(self, prompts: list[list[int]], sampling: Sampling, on_finished=None, stop=None) -> list[list[int]]:
        """`on_finished(n)`, if given, is called as sequences finish (progress logging); `stop(tokens)`, if
        given, ends a sequence whose tokens so far it accepts (a stop string in their text)."""
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
                    do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
                ended: dict[int, int] = {}  # row -> its length when `stop` ended it (padding follows)
                if stop is not None:
                    kwargs["stopping_criteria"] = _stop_criteria(stop, ids.shape[1], ended)
                with torch.inference_mode():
                    gen = self.model.generate(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=sampling.max_new_tokens,
                        eos_token_id=list(stop_ids(self.eos_token_id)) or None,
                        pad_token_id=self.pad_token_id,
                        **kwargs,
                    )
                for j, (row, i) in enumerate(zip(gen[:, ids.shape[1]:].tolist(), chunk)):
                    out[i] = cut_at_eos(row[: ended.get(j)], self.eos_token_id)
                if on_finished is not None:
                    on_finished(len(chunk))
        return out  # type: ignore[return-value]


def _stop_criteria(stop, prompt_width: int, ended: dict):
    """transformers' StoppingCriteria asking `stop` about each row's new tokens; `ended[row]` is the length
    at which a row was first stopped."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopCriteria(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            for j, row in enumerate(input_ids[:, prompt_width:].tolist()):
                if j not in ended and stop(row):
                    ended[j] = len(row)
            return torch.tensor([j in ended for j in range(input_ids.shape[0])], device=input_ids.device)

    return StoppingCriteriaList([StopCriteria()])

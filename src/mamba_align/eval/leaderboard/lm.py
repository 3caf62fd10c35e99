"""lm-evaluation-harness's model class for our Mamba checkpoints: `--model mamba_align`.

`MambaAlignLM` tokenises as lm-eval's stock `hf` model (HFLM) does (context/continuation split, BOS as
HFLM handles it for this tokenizer, left truncation to `max_length`), so its scores compare with the stock
path's; it differs in how the model is run:

- log-likelihoods read each shared context once and score every choice from the cached state
  (eval/leaderboard/scoring.py);
- generation goes through the project's engine (eval/engine: mamba_ssm with CUDA graphs on a GPU,
  transformers elsewhere), greedy unless the request samples, cut at the request's `until` strings;
- the chat-template hooks use the checkpoint's own template, so IFEval runs with the model's chat format.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    _add_special_kwargs,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
    resolve_max_length,
)

from mamba_align.eval.engine import load_engine
from mamba_align.eval.engine.sampling import Sampling
from mamba_align.eval.leaderboard.run import compile_templates_once
from mamba_align.eval.leaderboard.scoring import HFScorer, SSMScorer, score

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 64
DEFAULT_MAX_LENGTH = 2048  # HFLM's default when neither the config nor the tokenizer names one (Mamba's case)
DEFAULT_MAX_GEN_TOKS = 256  # HFLM's


@contextlib.contextmanager
def parallel_tokenizer():
    """Batched encoding on every core: the jobs set TOKENIZERS_PARALLELISM=false (no fork-after-use deadlocks in
    data loaders), which leaves the Rust tokenizer on one thread; it reads the variable at each call. The
    leaderboard encodes ~100M tokens of few-shot contexts per suite."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def _torch_dtype(dtype):
    import torch

    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return None if dtype == "auto" else dtype
    if not isinstance(dtype, str) or not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype name (e.g. bfloat16, float32)")
    return getattr(torch, dtype)


def _batch_size(batch_size) -> int:
    if batch_size is None or str(batch_size).startswith("auto"):
        return DEFAULT_BATCH_SIZE
    try:
        value = int(batch_size)
    except ValueError:
        raise ValueError(f"batch_size {batch_size!r} is not a positive integer or 'auto'") from None
    if value < 1:
        raise ValueError(f"batch_size {batch_size!r} is not a positive integer or 'auto'")
    return value


@register_model("mamba_align")
class MambaAlignLM(TemplateLM):
    """A local transformers Mamba checkpoint (model_type "mamba") for lm-eval.

    `batch_size` is the number of rows scored or generated together: choices of a log-likelihood batch
    (a power-of-two CUDA-graph size on the GPU) and the engine's decode slots. `backend` is the engine's:
    "auto" (mamba_ssm on CUDA when importable, else transformers), "mamba_ssm" or "transformers".
    `prefill_tokens` bounds the padded positions of one prefill or forward batch."""

    def __init__(self, pretrained: str, device: str | None = None, batch_size: int | str = DEFAULT_BATCH_SIZE,
                 dtype=None, backend: str = "auto", max_length: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, prefill_tokens: int = 16384,
                 add_bos_token: bool | None = None, max_batch_size: int | None = None, **kwargs):
        super().__init__()
        # also when lm-eval builds this class by name (`lm_eval --model mamba_align`), outside evaluate_leaderboard
        compile_templates_once()
        if kwargs:
            log.warning("mamba_align ignores the model arguments %s", sorted(kwargs))
        self.pretrained = str(pretrained)
        self.batch_rows = _batch_size(batch_size)
        self.engine = load_engine(self.pretrained, device=device, batch_size=self.batch_rows, backend=backend,
                                  dtype=_torch_dtype(dtype))
        self.tokenizer = self.engine.tokenizer
        if self.engine.name == "mamba_ssm":
            self.scorer = SSMScorer(self.engine, self.batch_rows)
        else:
            self.scorer = HFScorer(self.engine.model)
        self._device = self.scorer.device
        self.add_bos_token = add_bos_token
        from transformers import AutoConfig

        self._max_length = int(max_length) if max_length else resolve_max_length(
            AutoConfig.from_pretrained(self.pretrained), self.tokenizer, default=DEFAULT_MAX_LENGTH)
        self._max_gen_toks = int(max_gen_toks)
        self.prefill_tokens = int(prefill_tokens)
        log.info("mamba_align: %s backend, %d rows per batch, max_length %d", self.engine.name, self.batch_rows,
                 self._max_length)

    # ------------------------------------------------------------------ tokenisation (as HFLM)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.batch_rows

    def _special(self, string: str, add_special_tokens: bool | None = None) -> dict:
        """The tokenizer's special-token argument for `string`, as HFLM.tok_encode decides it: no second BOS
        when the string already opens with it."""
        special = _add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(string, self._bos_text):
            special["add_special_tokens"] = False
        return special

    @functools.cached_property
    def _bos_text(self) -> str:
        return self.tokenizer.decode(self.prefix_token_id)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None,
                   **kwargs) -> list[int]:
        enc = self.tokenizer.encode(string, **self._special(string, add_special_tokens))
        return enc[-left_truncate_len:] if left_truncate_len else enc

    def _encode_many(self, strings) -> dict[str, list[int]]:
        """`tok_encode` of each distinct string, in one batched tokenizer call per special-token argument (the
        same ids), on every core the job has."""
        groups: dict[tuple, list[str]] = {}
        for string in dict.fromkeys(strings):
            groups.setdefault(tuple(self._special(string).items()), []).append(string)
        out = {}
        with parallel_tokenizer():
            for special, group in groups.items():
                out.update(zip(group, self.tokenizer(group, **dict(special))["input_ids"], strict=True))
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """As TemplateLM.loglikelihood, with the same token ids, but each distinct string encoded once and in
        batches: the four choices of a question share their context, and per-request encoding of few-shot
        contexts took a third of MMLU's time (docs/benchmarks.md §17)."""
        split = []  # (context, continuation) with the context's trailing spaces moved, as TemplateLM._encode_pair
        for context, continuation in (req.args for req in requests):
            n = len(context) - len(context.rstrip())
            split.append((context[:-n], context[-n:] + continuation) if n and context else (context, continuation))
        enc = self._encode_many([s for ctx, cont in split if ctx for s in (ctx + cont, ctx)])
        new_reqs = []
        for req, (ctx, cont) in zip(requests, split, strict=True):
            if ctx:
                ctx_enc = enc[ctx]
                new_reqs.append((req.args, ctx_enc, enc[ctx + cont][len(ctx_enc):]))
            else:  # TemplateLM's empty context: BOS (or EOS) as the context
                cont_enc = self.tok_encode(cont, add_special_tokens=False)
                pair = ([self.prefix_token_id], cont_enc) if self.prefix_token_id != cont_enc[0] else \
                    (cont_enc[:1], cont_enc[1:])
                new_reqs.append((req.args, *pair))
        return self._loglikelihood_tokens(new_reqs, disable_tqdm=disable_tqdm)

    def _encode_contexts(self, contexts: list[str], left_truncate_len: int) -> list[list[int]]:
        """As HFLM.tok_batch_encode (the first string decides BOS handling for the batch), without padding."""
        special = {}
        if has_bos_prefix(contexts[0], getattr(self.tokenizer, "bos_token", None)):
            special = {"add_special_tokens": False}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        with parallel_tokenizer():
            ids = self.tokenizer(list(contexts), **special)["input_ids"]
        return [row[-left_truncate_len:] for row in ids]

    # ------------------------------------------------------------------ log-likelihoods

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        import torch

        pairs = []
        for _, ctx, cont in requests:
            if not cont or len(cont) > self.max_length:
                raise ValueError(f"continuation of {len(cont)} tokens: expected 1 to max_length "
                                 f"({self.max_length})")
            over = len(ctx) + len(cont) - (self.max_length + 1)
            pairs.append((ctx[over:] if over > 0 else ctx, cont))  # HFLM keeps the last max_length + 1 tokens
        from tqdm import tqdm

        with torch.inference_mode(), tqdm(total=len(pairs), disable=disable_tqdm or len(pairs) < 2,
                                          desc="Running loglikelihood requests") as bar:
            results = score(pairs, self.scorer, max_rows=self.batch_rows, max_tokens=self.prefill_tokens,
                            progress=bar.update)
        for (request_str, _, _), answer in zip(requests, results, strict=True):
            if request_str is not None:
                self.cache_hook.add_partial("loglikelihood", request_str, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """HFLM's rolling windows (max_length tokens, one token of context), each scored in one forward."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows), strict=True):
            totals[i] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        eos = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        for idxs in groups.values():
            gen_kwargs = requests[idxs[0]].args[1]
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = int(kwargs.pop("max_gen_toks"))
            if self.max_length - max_gen_toks <= 0:
                raise ValueError(f"max_gen_toks {max_gen_toks} must be less than max_length {self.max_length}")
            sampling = Sampling(
                temperature=float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0,
                top_p=float(kwargs.get("top_p") or 1.0), top_k=int(kwargs.get("top_k") or 0),
                max_new_tokens=max_gen_toks)
            contexts = [requests[i].args[0] for i in idxs]
            prompts = self._encode_contexts(contexts, self.max_length - max_gen_toks)
            terms = [u for u in until if u]

            def stop(tokens, terms=terms):  # a stop string in the text so far: what follows is cut anyway
                return any(u in self.tokenizer.decode(tokens, skip_special_tokens=True) for u in terms)

            for i, tokens in zip(idxs, self.engine.generate(prompts, sampling, stop=stop), strict=True):
                text = postprocess_generated_text(self.tokenizer.decode(tokens, skip_special_tokens=True), until,
                                                  None)
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ chat template (as HFLM)

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        import jinja2

        def render(history):
            return self.tokenizer.apply_chat_template(history, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=not add_generation_prompt)

        try:
            return render(chat_history)
        except jinja2.exceptions.TemplateError:
            log.warning("chat template failed; retrying without the system turn (as HFLM does)")
            return render([m for m in chat_history if m["role"] != "system"])

    def get_model_info(self) -> dict:
        return {"model_backend": self.engine.name, "pretrained": self.pretrained}

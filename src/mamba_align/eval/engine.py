"""Text generation engines for the evaluation steps.

`load_engine` picks the fastest engine the machine has. Every engine takes token-id prompts and returns
the new token ids of each prompt, stopped at (and without) the model's eos, honouring the sampling
parameters per call. The transformers engine is the portable fallback (CPU included).

`MambaSSMEngine` (CUDA + mamba_ssm) loads the transformers checkpoint's weights into mamba_ssm's
`MambaLMHeadModel` and decodes with CUDA graphs. Its decode loop keeps a fixed number of slots busy
(continuous batching): a Mamba sequence's whole context is a fixed-size state, so a finished sequence's
slot is refilled with the next prompt at once. Prompts of different lengths are prefilled together,
left-padded, with the padding masked out of the convolution input and the scan input: a masked position
adds exactly zero to the state, so each sequence's state and outputs are those of an unpadded run.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)


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
    def from_model(cls, model, tokenizer=None, batch_size: int = 8) -> "TransformersEngine":
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
        stops = _stop_ids(self.eos_token_id)
        self.pad_token_id = tok_pad if tok_pad is not None else (stops[0] if stops else 0)
        self.batch_size = batch_size

    def generate(self, prompts: list[list[int]], sampling: Sampling, on_finished=None) -> list[list[int]]:
        """`on_finished(n)`, if given, is called as sequences finish (progress logging)."""
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
                with torch.inference_mode():
                    gen = self.model.generate(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=sampling.max_new_tokens,
                        eos_token_id=list(_stop_ids(self.eos_token_id)) or None,
                        pad_token_id=self.pad_token_id,
                        **kwargs,
                    )
                for row, i in zip(gen[:, ids.shape[1]:].tolist(), chunk):
                    out[i] = _cut_at_eos(row, self.eos_token_id)
                if on_finished is not None:
                    on_finished(len(chunk))
        return out  # type: ignore[return-value]


def _stop_ids(eos) -> tuple[int, ...]:
    """generation_config.eos_token_id (None, one id or a list) as a tuple of ids."""
    if eos is None:
        return ()
    if isinstance(eos, (list, tuple)):
        return tuple(int(e) for e in eos if e is not None)
    return (int(eos),)


def _cut_at_eos(tokens: list[int], eos) -> list[int]:
    """The tokens before the first stop id (eos: None, one id or several)."""
    stops = set(_stop_ids(eos))
    return next((tokens[:i] for i, t in enumerate(tokens) if t in stops), tokens)


# ---------------------------------------------------------------------------------- checkpoint mapping


def mamba_ssm_config_from_hf(hf_config) -> dict:
    """mamba_ssm `MambaConfig` fields for a transformers `MambaConfig` (model_type "mamba").

    `pad_vocab_size_multiple=1` keeps exactly the checkpoint's embedding rows, so token ids and logits
    line up one to one with the transformers model."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type != "mamba":
        raise ValueError(f"the mamba_ssm engine handles Mamba-1 checkpoints (model_type 'mamba'), not {model_type!r}")
    act = getattr(hf_config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"config hidden_act is {act!r}; mamba_ssm's Mamba mixer only implements silu")
    d_inner = int(hf_config.expand * hf_config.hidden_size)
    if int(hf_config.intermediate_size) != d_inner:
        raise ValueError(f"config intermediate_size {hf_config.intermediate_size} != expand * hidden_size "
                         f"({d_inner}); mamba_ssm derives d_inner from expand")
    return dict(
        d_model=int(hf_config.hidden_size),
        d_intermediate=0,
        n_layer=int(hf_config.num_hidden_layers),
        vocab_size=int(hf_config.vocab_size),
        ssm_cfg=dict(
            layer="Mamba1",
            d_state=int(hf_config.state_size),
            d_conv=int(hf_config.conv_kernel),
            expand=int(hf_config.expand),
            dt_rank=int(hf_config.time_step_rank),
            conv_bias=bool(hf_config.use_conv_bias),
            bias=bool(hf_config.use_bias),
        ),
        rms_norm=True,
        residual_in_fp32=bool(getattr(hf_config, "residual_in_fp32", True)),
        fused_add_norm=True,
        pad_vocab_size_multiple=1,
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
    )


def hf_to_mamba_ssm_state_dict(state_dict: dict, tie_embeddings: bool) -> dict:
    """Rename a transformers MambaForCausalLM state dict to mamba_ssm's MambaLMHeadModel keys.

    Only the embedding differs (`backbone.embeddings` -> `backbone.embedding`). With tied embeddings,
    `lm_head.weight` is the embedding (transformers' save_pretrained leaves the tied copy out; mamba_ssm's
    state dict lists it under both names)."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("backbone.embeddings."):
            key = "backbone.embedding." + key[len("backbone.embeddings."):]
        out[key] = value
    if tie_embeddings:
        out["lm_head.weight"] = out["backbone.embedding.weight"]
    elif "lm_head.weight" not in out:
        raise ValueError("tie_word_embeddings is false but the checkpoint has no lm_head.weight")
    return out


def read_checkpoint_state_dict(model_dir: str | Path) -> dict:
    """All tensors of a transformers checkpoint folder (safetensors, single file or sharded), on the CPU."""
    import json

    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (model_dir / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{model_dir}: no model.safetensors or model.safetensors.index.json "
                                "(the mamba_ssm engine reads safetensors checkpoints)")
    state_dict = {}
    for name in files:
        state_dict.update(load_file(str(model_dir / name)))
    return state_dict


# ------------------------------------------------------------------------------------------- sampling


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


# ---------------------------------------------------------------------------------- continuous batching


def _slot_sizes(batch_size: int) -> list[int]:
    """Slot counts a decoder may be built for: powers of two up to `batch_size`, and `batch_size` itself.
    Few sizes, so CUDA graphs are reused across calls."""
    sizes = {batch_size}
    s = 1
    while s < batch_size:
        sizes.add(s)
        s *= 2
    return sorted(sizes)


def _fit(n: int, sizes: list[int]) -> int:
    return next((s for s in sizes if s >= n), sizes[-1])


def decode_loop(prompts: list[list[int]], sampling: Sampling, eos_token_id, get_runner: Callable,
                batch_size: int, sync_every: int = 16, prefill_tokens: int = 16384,
                on_finished: Callable[[int], None] | None = None) -> list[list[int]]:
    """Generate for every prompt with a fixed set of decode slots, refilling a slot as soon as its sequence ends.

    `get_runner(slots)` returns an object with `.slots`, `.device`, `.prefill(slot_ids, prompts) -> logits`
    (writes those slots' states, returns each prompt's next-token logits), `.step(tokens) -> logits` (one
    decode step for all slots) and `.copy_slots_from(other, src, dst)`. The host looks at the GPU only
    every `sync_every` steps; a sequence that ended meanwhile generates a few discarded tokens.
    When the queue is empty and few sequences remain, they move to a smaller runner."""
    import torch

    n = len(prompts)
    results: list[list[int] | None] = [None] * n
    max_new = sampling.max_new_tokens
    if max_new <= 0 or n == 0:
        return [[] for _ in prompts]
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: the engine needs at least one prompt token")

    sizes = _slot_sizes(batch_size)
    runner = get_runner(_fit(n, sizes))
    dev = runner.device
    stops = torch.tensor(_stop_ids(eos_token_id), dtype=torch.long, device=dev)  # eos: None, one id or several
    # Longest first: prompts prefilled together then have similar lengths (little padding).
    queue = deque(sorted(range(n), key=lambda i: -len(prompts[i])))

    def new_buffers(slots: int):
        return (torch.zeros(slots, max_new, dtype=torch.long, device=dev),  # generated tokens
                torch.zeros(slots, dtype=torch.long, device=dev),  # last token
                torch.zeros(slots, dtype=torch.long, device=dev),  # tokens generated so far
                torch.ones(slots, dtype=torch.bool, device=dev))  # finished (idle slots count as finished)

    out_buf, last, pos, done = new_buffers(runner.slots)
    owner = [-1] * runner.slots  # prompt index in each slot, -1 = idle
    count = [0] * runner.slots  # host copy of pos for live slots
    arange = torch.arange(runner.slots, device=dev)

    def fill(free: list[int]) -> None:
        take = []
        while free and queue:
            take.append((free.pop(0), queue.popleft()))
        start = 0
        while start < len(take):
            # group so that the padded prefill stays under prefill_tokens (lengths are sorted descending)
            width = len(prompts[take[start][1]])
            end = start + max(1, min(len(take) - start, prefill_tokens // max(width, 1)))
            group = take[start:end]
            start = end
            slots = [s for s, _ in group]
            logits = runner.prefill(slots, [prompts[i] for _, i in group])
            tok = sample_next(logits, sampling)
            idx = torch.tensor(slots, device=dev)
            out_buf[idx, 0] = tok
            last[idx] = tok
            pos[idx] = 1
            done[idx] = torch.isin(tok, stops)
            for s, i in group:
                owner[s] = i
                count[s] = 1

    fill(list(range(runner.slots)))
    while True:
        live = [s for s in range(runner.slots) if owner[s] >= 0]
        finished_host = done.tolist()
        ended = [s for s in live if finished_host[s] or count[s] >= max_new]
        for s in ended:
            row = out_buf[s, : count[s]].tolist()
            results[owner[s]] = _cut_at_eos(row, eos_token_id)
            owner[s] = -1
            done[s] = True
        if ended and on_finished is not None:
            on_finished(len(ended))
        if ended and queue:
            fill(ended)
        live = [s for s in range(runner.slots) if owner[s] >= 0]
        if not live:
            break
        if not queue and runner.slots > 1 and len(live) * 4 <= runner.slots:
            # few sequences left: continue them on a smaller runner (fewer idle slots per step)
            smaller = get_runner(_fit(len(live), sizes))
            if smaller.slots < runner.slots:
                src = torch.tensor(live, device=dev)
                dst_slots = list(range(len(live)))
                smaller.copy_slots_from(runner, live, dst_slots)
                b_out, b_last, b_pos, b_done = new_buffers(smaller.slots)
                dst = torch.tensor(dst_slots, device=dev)
                b_out[dst], b_last[dst], b_pos[dst], b_done[dst] = out_buf[src], last[src], pos[src], done[src]
                out_buf, last, pos, done = b_out, b_last, b_pos, b_done
                owner = [owner[s] for s in live] + [-1] * (smaller.slots - len(live))
                count = [count[s] for s in live] + [0] * (smaller.slots - len(live))
                runner = smaller
                arange = torch.arange(runner.slots, device=dev)
                live = dst_slots
        steps = min(sync_every, min(max_new - count[s] for s in live))
        for _ in range(steps):
            logits = runner.step(last)
            tok = sample_next(logits, sampling)
            out_buf[arange, pos.clamp(max=max_new - 1)] = tok
            pos += 1
            if len(stops):
                done |= torch.isin(tok, stops)
            last = tok
        for s in live:
            count[s] += steps
    return results  # type: ignore[return-value]


# --------------------------------------------------------------------------------- mamba_ssm engine


def masked_mixer_prefill(m, hidden, mask, conv_fn, scan_fn):
    """Mamba-1 mixer over a left-padded batch; returns (output, conv_state, ssm_state).

    `m` has mamba_ssm's Mamba attributes (in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj, d_conv,
    d_state, dt_rank). `mask` (batch, L) is True on real tokens, or None when no row is padded.
    The convolution input and the scan input are zeroed on padding, so padding adds nothing to the state:
    the state starts at zero at the first real token, as in an unpadded run. `conv_fn(x, weight, bias)`
    is a causal depthwise convolution + silu; `scan_fn` has the signature of mamba_ssm's selective_scan_fn.
    """
    import torch.nn.functional as F

    batch, seqlen, _ = hidden.shape
    xz = m.in_proj(hidden).transpose(1, 2)  # (b, 2*d_inner, L)
    x, z = xz.chunk(2, dim=1)
    keep = None if mask is None else mask[:, None, :].to(x.dtype)
    if keep is not None:
        x = x * keep
    conv_state = F.pad(x, (m.d_conv - seqlen, 0)) if seqlen < m.d_conv else x[..., -m.d_conv:]
    x = conv_fn(x.contiguous(), m.conv1d.weight.squeeze(1), m.conv1d.bias)
    if keep is not None:
        x = x * keep
    x_dbl = m.x_proj(x.transpose(1, 2).reshape(batch * seqlen, -1))
    dt, B, C = x_dbl.split([m.dt_rank, m.d_state, m.d_state], dim=-1)
    dt = (m.dt_proj.weight @ dt.t()).reshape(-1, batch, seqlen).transpose(0, 1)  # (b, d_inner, L)
    B = B.reshape(batch, seqlen, -1).transpose(1, 2).contiguous()  # (b, d_state, L)
    C = C.reshape(batch, seqlen, -1).transpose(1, 2).contiguous()
    A = -(m.A_log.float().exp())
    y, last_state = scan_fn(x, dt.contiguous(), A, B, C, m.D.float(), z=z.contiguous(),
                            delta_bias=m.dt_proj.bias.float(), delta_softplus=True, return_last_state=True)
    return m.out_proj(y.transpose(1, 2)), conv_state, last_state


class _GraphRunner:
    """Decode state and a CUDA-graph-captured decode step of mamba_ssm's model for a fixed number of slots."""

    def __init__(self, engine: "MambaSSMEngine", slots: int):
        import torch
        from mamba_ssm.utils.generation import InferenceParams

        self.engine, self.slots = engine, slots
        model = engine.model
        self.device = engine.device
        self.states = {}
        for layer in model.backbone.layers:
            m = layer.mixer
            conv = torch.zeros(slots, m.d_inner, m.d_conv, device=self.device, dtype=m.conv1d.weight.dtype)
            ssm = torch.zeros(slots, m.d_inner, m.d_state, device=self.device, dtype=engine.state_dtype)
            self.states[m.layer_idx] = (conv, ssm)
        # seqlen_offset > 0 selects Mamba.step (one token against the cached state); Mamba-1 reads nothing else
        self.params = InferenceParams(max_seqlen=1, max_batch_size=slots, seqlen_offset=1,
                                      key_value_memory_dict=self.states)
        self.tokens = torch.zeros(slots, 1, dtype=torch.long, device=self.device)
        self.graph = None
        if engine.cuda_graphs:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # triton autotuning and lazy init happen outside the capture
                    self._forward()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=engine.graph_pool):
                self.logits = self._forward()

    def _forward(self):
        return self.engine.model(self.tokens, inference_params=self.params, num_last_tokens=1).logits[:, -1]

    def step(self, tokens):
        self.tokens[:, 0].copy_(tokens)
        if self.graph is None:
            return self._forward()
        self.graph.replay()
        return self.logits

    def copy_slots_from(self, other: "_GraphRunner", src: list[int], dst: list[int]) -> None:
        import torch

        si = torch.tensor(src, device=self.device)
        di = torch.tensor(dst, device=self.device)
        for key, (conv, ssm) in self.states.items():
            oconv, ossm = other.states[key]
            conv.index_copy_(0, di, oconv.index_select(0, si))
            ssm.index_copy_(0, di, ossm.index_select(0, si))

    def prefill(self, slots: list[int], prompts: list[list[int]]):
        import torch
        from causal_conv1d import causal_conv1d_fn
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        from mamba_ssm.ops.triton.layer_norm import layer_norm_fn

        model = self.engine.model
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.bool)
        for j, p in enumerate(prompts):
            ids[j, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[j, width - len(p):] = True
        ids = ids.to(self.device, non_blocking=True)
        mask = mask.to(self.device, non_blocking=True) if any(len(p) != width for p in prompts) else None
        slot_idx = torch.tensor(slots, device=self.device)

        def conv_fn(x, weight, bias):
            return causal_conv1d_fn(x, weight, bias, activation="silu")

        hidden = model.backbone.embedding(ids)
        residual = None
        for layer in model.backbone.layers:
            hidden, residual = layer_norm_fn(hidden, layer.norm.weight, layer.norm.bias, residual=residual,
                                             prenorm=True, residual_in_fp32=layer.residual_in_fp32,
                                             eps=layer.norm.eps, is_rms_norm=True)
            hidden, conv_new, ssm_new = masked_mixer_prefill(layer.mixer, hidden, mask, conv_fn, selective_scan_fn)
            conv, ssm = self.states[layer.mixer.layer_idx]
            conv.index_copy_(0, slot_idx, conv_new.to(conv.dtype))
            ssm.index_copy_(0, slot_idx, ssm_new.to(ssm.dtype))
        norm_f = model.backbone.norm_f
        hidden = layer_norm_fn(hidden[:, -1:], norm_f.weight, norm_f.bias, residual=residual[:, -1:],
                               prenorm=False, residual_in_fp32=model.backbone.residual_in_fp32,
                               eps=norm_f.eps, is_rms_norm=True)
        return model.lm_head(hidden)[:, 0]


class MambaSSMEngine:
    """mamba_ssm's MambaLMHeadModel with the transformers checkpoint's weights; CUDA-graph decoding with
    continuous batching over `batch_size` slots. Needs CUDA, mamba_ssm and causal_conv1d.

    `state_dtype` is the SSM state's dtype during decoding: float32 by default (the recurrence runs over
    thousands of steps; transformers keeps it in float32 too); bfloat16 halves the state traffic."""

    name = "mamba_ssm"

    def __init__(self, model_dir: str, device: str | None = None, batch_size: int = 64, dtype=None,
                 state_dtype=None, cuda_graphs: bool = True):
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        hf_config = AutoConfig.from_pretrained(model_dir)
        try:
            gen_config = GenerationConfig.from_pretrained(model_dir)
        except OSError:
            gen_config = GenerationConfig.from_model_config(hf_config)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        state_dict = read_checkpoint_state_dict(model_dir)
        self._build(hf_config, state_dict, tokenizer, gen_config.eos_token_id, device, batch_size, dtype,
                    state_dtype, cuda_graphs)

    @classmethod
    def from_model(cls, model, tokenizer=None, batch_size: int = 64, dtype=None, state_dtype=None,
                   cuda_graphs: bool = True) -> "MambaSSMEngine":
        """An engine with the weights of an in-memory transformers MambaForCausalLM (benchmarks and tests)."""
        self = cls.__new__(cls)
        device = str(next(model.parameters()).device)
        self._build(model.config, model.state_dict(), tokenizer, model.generation_config.eos_token_id, device,
                    batch_size, dtype, state_dtype, cuda_graphs)
        return self

    def _build(self, hf_config, state_dict, tokenizer, eos, device, batch_size, dtype, state_dtype, cuda_graphs):
        import torch
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

        self.device = torch.device(device or "cuda")
        if self.device.type != "cuda":
            raise ValueError(f"the mamba_ssm engine needs a CUDA device, got {device!r}")
        self.dtype = dtype or torch.bfloat16
        self.state_dtype = state_dtype or torch.float32
        self.tokenizer = tokenizer
        self.eos_token_id = eos  # one id or several
        self.batch_size = batch_size
        self.cuda_graphs = cuda_graphs
        cfg = mamba_ssm_config_from_hf(hf_config)
        model = MambaLMHeadModel(MambaConfig(**cfg), device=self.device, dtype=self.dtype)
        eps = float(getattr(hf_config, "layer_norm_epsilon", 1e-5))  # MambaLMHeadModel does not take it
        for layer in model.backbone.layers:
            layer.norm.eps = eps
        model.backbone.norm_f.eps = eps
        mapped = hf_to_mamba_ssm_state_dict(state_dict, cfg["tie_embeddings"])
        model.load_state_dict(mapped, strict=True)
        self.model = model.eval()
        self.graph_pool = torch.cuda.graph_pool_handle() if cuda_graphs else None
        self._runners: dict[int, _GraphRunner] = {}

    def _runner(self, slots: int) -> _GraphRunner:
        if slots not in self._runners:
            self._runners[slots] = _GraphRunner(self, slots)
        return self._runners[slots]

    def generate(self, prompts: list[list[int]], sampling: Sampling, on_finished=None) -> list[list[int]]:
        import torch

        torch.manual_seed(sampling.seed)
        with torch.inference_mode():
            return decode_loop(prompts, sampling, self.eos_token_id, self._runner, self.batch_size,
                               on_finished=on_finished)


def _mamba_ssm_missing() -> str | None:
    """Why the mamba_ssm engine cannot run here, or None."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    for mod in ("mamba_ssm", "causal_conv1d", "selective_scan_cuda"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed"
    return None


def load_engine(model_dir: str, device: str | None = None, batch_size: int = 8, backend: str = "auto", **kwargs):
    """Return the best available engine ("auto"), or the one named by `backend` ("mamba_ssm", "transformers")."""
    if backend not in ("auto", "transformers", "mamba_ssm"):
        raise ValueError(f"unknown generation backend {backend!r} (expected auto, mamba_ssm or transformers)")
    if device is None or str(device).startswith("cuda"):
        from mamba_align.model.kernels import require_kernels

        require_kernels("generation")  # before the model loads: the transformers path is ~10x slower on GPU
    if backend in ("auto", "mamba_ssm"):
        missing = _mamba_ssm_missing()
        if missing is None and device is not None and not str(device).startswith("cuda"):
            missing = f"device {device!r} is not a CUDA device"
        if missing is None:
            from transformers import AutoConfig

            model_type = getattr(AutoConfig.from_pretrained(model_dir), "model_type", None)
            if model_type != "mamba":
                missing = f"model_type {model_type!r} is not Mamba-1"
        if missing is None:
            log.info("generation engine: mamba_ssm (CUDA graphs, %d slots)", batch_size)
            return MambaSSMEngine(model_dir, device=device, batch_size=batch_size, **kwargs)
        if backend == "mamba_ssm":
            raise RuntimeError(f"generation backend 'mamba_ssm' is unavailable: {missing}")
        log.info("generation engine: transformers (%s)", missing)
    return TransformersEngine(model_dir, device=device, batch_size=batch_size, dtype=kwargs.get("dtype"))

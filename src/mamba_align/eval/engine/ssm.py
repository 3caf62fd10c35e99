"""The fast generation engine (CUDA + mamba_ssm + causal_conv1d).

`MambaSSMEngine` loads the transformers checkpoint's weights into mamba_ssm's `MambaLMHeadModel`
(through model/mapping.py) and decodes with CUDA graphs in the continuous-batching loop of
eval/engine/decode.py. Prompts of different lengths are prefilled together, left-padded, with the padding masked
out of the convolution input and the scan input (`masked_mixer_prefill`): a masked position adds exactly
zero to the state, so each sequence's state and outputs are those of an unpadded run.
"""

from __future__ import annotations

from types import SimpleNamespace

from mamba_align.eval.engine.decode import decode_loop
from mamba_align.eval.engine.sampling import Sampling
from mamba_align.model.mapping import (
    hf_to_mamba_ssm_state_dict,
    mamba_ssm_config_from_hf,
    read_checkpoint_state_dict,
)


def prefill_width(prompts: list[list[int]]) -> int:
    """The padded width of a prefill batch: its longest prompt rounded up to a multiple of 8 (an odd width
    misaligns every GEMM and the convolution's vector loads: ~2x slower on H200, docs/benchmarks.md §15)."""
    return -(-max(len(p) for p in prompts) // 8) * 8


def left_padded(seqs: list[list[int]], width: int | None = None):
    """(ids, mask) of a batch left-padded to `width` (default: its longest row); mask (bool, True on real
    tokens) is None when no row is padded."""
    import torch

    width = width or max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for j, s in enumerate(seqs):
        ids[j, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[j, width - len(s):] = True
    return ids, (None if all(len(s) == width for s in seqs) else mask)


def masked_mixer_prefill(m, hidden, mask, conv_fn, scan_fn):
    """Mamba-1 mixer over a left-padded batch; returns (output, conv_state, ssm_state).

    `m` has mamba_ssm's Mamba attributes (in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj, d_conv,
    d_state, dt_rank). `mask` (batch, L) is True on real tokens, or None when no row is padded.
    Padding adds nothing to the state: the convolution input is zero there (the mixer's input is zeroed
    before in_proj, which has no bias; else its output is), and so is the scan's B (the state starts at zero
    at the first real token, as in an unpadded run). `conv_fn(x, weight, bias)` is a causal depthwise
    convolution + silu; `scan_fn` has the signature of mamba_ssm's selective_scan_fn.
    The activations stay in (batch, channels, L) layout, as mamba_inner_fn keeps them: in_proj is one GEMM
    read as a (batch, 2*d_inner, L) view, x_proj and dt_proj batched GEMMs; no (L, channels) transposes.
    """
    import torch
    import torch.nn.functional as F

    batch, seqlen, dim = hidden.shape
    live = None if mask is None else mask[:, :, None]
    if live is not None and m.in_proj.bias is None:
        hidden = torch.where(live, hidden, 0)  # where, not a product: padding activations may be inf/nan
    xz = (m.in_proj.weight @ hidden.reshape(batch * seqlen, dim).t()).view(-1, batch, seqlen).transpose(0, 1)
    if m.in_proj.bias is not None:
        xz = xz + m.in_proj.bias[None, :, None]
    x, z = xz.chunk(2, dim=1)
    if live is not None and m.in_proj.bias is not None:
        x = torch.where(live.transpose(1, 2), x, 0)
    conv_state = F.pad(x, (m.d_conv - seqlen, 0)) if seqlen < m.d_conv else x[..., -m.d_conv:]
    x = conv_fn(x, m.conv1d.weight.squeeze(1), m.conv1d.bias)  # (b, d_inner, L), contiguous
    x_dbl = torch.bmm(m.x_proj.weight.expand(batch, -1, -1), x)  # (b, dt_rank + 2*d_state, L)
    dt, B, C = x_dbl.split([m.dt_rank, m.d_state, m.d_state], dim=1)
    dt = torch.bmm(m.dt_proj.weight.expand(batch, -1, -1), dt)  # (b, d_inner, L)
    if live is not None:
        B = B * live.transpose(1, 2).to(B.dtype)  # B = 0 on padding: the state stays zero there
    A = -(m.A_log.float().exp())
    y, last_state = scan_fn(x, dt, A, B.contiguous(), C.contiguous(), m.D.float(), z=z,
                            delta_bias=m.dt_proj.bias.float(), delta_softplus=True, return_last_state=True)
    return m.out_proj(y.transpose(1, 2)), conv_state, last_state


class _GraphRunner:
    """Decode state and a CUDA-graph-captured decode step of mamba_ssm's model for a fixed number of slots."""

    def __init__(self, engine: MambaSSMEngine, slots: int):
        import torch
        from mamba_ssm.utils.generation import InferenceParams

        self.engine, self.slots = engine, slots
        model = engine.model
        self.device = engine.device
        # one tensor per kind for all layers, (layer, slot, ...): moving slots is one copy per kind, not one
        # per layer (the scorer moves slots often: 2 x 64 copies per move was CPU-bound, benchmarks §15)
        mixers = [layer.mixer for layer in model.backbone.layers]
        m = mixers[0]
        self.conv_all = torch.zeros(len(mixers), slots, m.d_inner, m.d_conv, device=self.device,
                                    dtype=m.conv1d.weight.dtype)
        self.ssm_all = torch.zeros(len(mixers), slots, m.d_inner, m.d_state, device=self.device,
                                   dtype=engine.state_dtype)
        self.states = {m.layer_idx: (self.conv_all[i], self.ssm_all[i]) for i, m in enumerate(mixers)}
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

    def _index(self, rows: list[int]):
        """Row numbers on the device without a host sync (copied from pinned memory)."""
        import torch

        return torch.tensor(rows, dtype=torch.long).pin_memory().to(self.device, non_blocking=True)

    def copy_slots_from(self, other: _GraphRunner, src: list[int], dst: list[int]) -> None:
        si, di = self._index(src), self._index(dst)
        self.conv_all.index_copy_(1, di, other.conv_all.index_select(1, si))
        self.ssm_all.index_copy_(1, di, other.ssm_all.index_select(1, si))

    def snapshot(self, slots: list[int]):
        """A copy of these slots' states; `copy_slots_from(snapshot, i, dst)` restores its i-th slot into dst."""
        si = self._index(slots)
        return SimpleNamespace(conv_all=self.conv_all.index_select(1, si), ssm_all=self.ssm_all.index_select(1, si))

    def prefill(self, slots: list[int], prompts: list[list[int]]):
        from causal_conv1d import causal_conv1d_fn
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        from mamba_ssm.ops.triton.layer_norm import layer_norm_fn

        model = self.engine.model
        ids, mask = left_padded(prompts, prefill_width(prompts))
        ids = ids.to(self.device, non_blocking=True)
        mask = mask.to(self.device, non_blocking=True) if mask is not None else None
        slot_idx = self._index(slots)

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
                   cuda_graphs: bool = True) -> MambaSSMEngine:
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

    def generate(self, prompts: list[list[int]], sampling: Sampling, on_finished=None, stop=None) -> list[list[int]]:
        """`stop(tokens)`: whether a sequence's tokens so far end it (decode.decode_loop)."""
        import torch

        torch.manual_seed(sampling.seed)
        with torch.inference_mode():
            return decode_loop(prompts, sampling, self.eos_token_id, self._runner, self.batch_size,
                               on_finished=on_finished, stop=stop)

"""A faster training forward for transformers' MambaForCausalLM, same checkpoint format.

`enable_fast_path(model)` patches one model instance (no new modules, no new parameters: the state dict
and `save_pretrained` / `from_pretrained` stay ordinary transformers):

- the backbone runs mamba_ssm's order of operations: the residual add of block i and the RMSNorm of block
  i+1 are one fused Triton kernel (`mamba_ssm.ops.triton.layer_norm.layer_norm_fn`, prenorm, residual kept
  in fp32), instead of transformers' separate fp32 norm, casts and add;
- in training each mixer computes its input projection as mamba_ssm does (`W_in @ X^T`, see
  `mixer_native_layout`) and calls `mamba_inner_fn` with the arguments transformers passes: no per-layer
  copy of the projection to contiguous and back (H100, 2.8B shape, batch 2: 0.994x the tokens/s of mamba_ssm's
  own model, against 0.82x with transformers' mixer call; docs/benchmarks.md §2);
- by default each mixer keeps its convolution output and time steps for the backward pass
  (`mamba_inner_fn(checkpoint_lvl=0)`) where mamba_ssm recomputes them (`checkpoint_lvl=1`): two
  (batch, d_inner, seq) bf16 tensors more per layer (10 GiB at the 2.8B shape and 8,192 tokens per step; none
  under gradient checkpointing, which frees the layer anyway) for one convolution and one projection less per
  layer in backward;
- the LM head and loss are transformers' (or TRL's fused LM head, `fused_lm_head=True`, which SFTTrainer and
  DPOTrainer use) on top of the fast backbone. Our own chunked loss kernel was measured against TRL's head at the
  recipes' settings and deleted: 0.6% faster, inside the run-to-run noise, and 1 GiB more memory
  (docs/benchmarks.md §9).

Anything the fast path does not cover (a cache, `use_cache=True`, `output_hidden_states`, tensors not on CUDA)
goes to the original forward, so generation is unchanged.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import types

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

log = logging.getLogger(__name__)

_PATCH_ATTR = "_mamba_align_fast_path"


def fast_path_enabled(model) -> bool:
    """Whether `enable_fast_path` / `patch_model` patched this model instance."""
    return _PATCH_ATTR in model.__dict__


def fast_path_unavailable(model=None) -> str | None:
    """Why the fast path cannot be enabled here (for this model), or None."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if importlib.util.find_spec("mamba_ssm") is None:
        return "mamba_ssm is not installed"
    try:
        from mamba_ssm.ops.triton.layer_norm import layer_norm_fn  # noqa: F401
    except Exception as e:  # a broken build: say so instead of failing mid-training
        return f"mamba_ssm's Triton layer norm does not import ({type(e).__name__}: {e})"
    if model is not None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type != "mamba":
            return f"model_type is {model_type!r}, the fast path is for transformers' Mamba-1 (model_type 'mamba')"
    return None


def enable_fast_path(model, native_mixer_layout: bool = True, save_mixer_activations: bool = True) -> bool:
    """Patch `model` (a transformers MambaForCausalLM) to train with mamba_ssm's fused add+RMSNorm and mixer
    call. Returns False, changing nothing, where CUDA or mamba_ssm is missing. Call it before building the
    trainer (before DDP / TRL wrap the model); gradient checkpointing set later is honoured.

    `native_mixer_layout`: in training, produce the mixer's input projection in mamba_ssm's layout (see
    `mixer_native_layout`) instead of calling transformers' mixer (False: transformers' own mixer call).
    `save_mixer_activations` (with the native layout): keep the convolution output and time steps for backward
    instead of recomputing them (more memory without gradient checkpointing, less time)."""
    reason = fast_path_unavailable(model)
    if reason is not None:
        log.info("mamba_ssm fast path not enabled: %s", reason)
        return False
    from mamba_ssm.ops.triton.layer_norm import layer_norm_fn

    mixer = None
    if native_mixer_layout:
        from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn

        inner = functools.partial(mamba_inner_fn, checkpoint_lvl=0 if save_mixer_activations else 1)
        mixer = functools.partial(mixer_native_layout, inner_fn=inner)
    patch_model(model, functools.partial(_triton_add_rms_norm, layer_norm_fn), cuda_only=True, mixer=mixer)
    log.info("mamba_ssm fast path enabled (fused add+RMSNorm, %s)",
             ("mamba_ssm's in_proj layout, mixer activations " + ("saved" if save_mixer_activations else
                                                                   "recomputed")) if native_mixer_layout
             else "transformers' mixer")
    return True


def disable_fast_path(model) -> None:
    """Undo `enable_fast_path` / `patch_model` on this instance."""
    saved = model.__dict__.pop(_PATCH_ATTR, None)
    if saved is None:
        return
    backbone_forward, layer_forwards = saved
    backbone = model.backbone
    for obj, fwd in ((backbone, backbone_forward), *zip(backbone.layers, layer_forwards)):
        if fwd is None:
            obj.__dict__.pop("forward", None)
        else:
            obj.forward = fwd


# ------------------------------------------------------------------------------------------ add + norm


def _triton_add_rms_norm(layer_norm_fn, x, weight, residual, eps, prenorm, residual_in_fp32):
    return layer_norm_fn(x, weight, None, residual=residual, eps=eps, prenorm=prenorm,
                         residual_in_fp32=residual_in_fp32, is_rms_norm=True)


def reference_add_rms_norm(x, weight, residual, eps, prenorm, residual_in_fp32):
    """What the Triton kernel computes, in plain PyTorch: r = x + residual (fp32 if asked);
    y = rmsnorm(r) * weight in fp32, returned in x's dtype; (y, r) when prenorm."""
    r = x if residual is None else x + residual
    r = r.float() if residual_in_fp32 else r.to(residual.dtype if residual is not None else x.dtype)
    rf = r.float()
    y = (rf * torch.rsqrt(rf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    return (y, r) if prenorm else y


# -------------------------------------------------------------------------------------------- patching


def patch_model(model, add_norm, cuda_only: bool = True, mixer=None) -> None:
    """Install the fast forwards with a given add+norm implementation (the Triton one, or the reference one
    in CPU tests). `cuda_only`: tensors elsewhere take the original forward. `mixer(module, hidden, mask)`
    replaces the call of transformers' mixer in training (None: transformers' own)."""
    if fast_path_enabled(model):
        disable_fast_path(model)
    backbone = model.backbone
    saved = (backbone.__dict__.get("forward"), [layer.__dict__.get("forward") for layer in backbone.layers])
    model.__dict__[_PATCH_ATTR] = saved
    for layer in backbone.layers:
        _patch_block(layer, add_norm, mixer)
    original_backbone_forward = backbone.forward

    @functools.wraps(type(backbone).forward)
    def backbone_forward(self, input_ids=None, inputs_embeds=None, use_cache=None, output_hidden_states=None,
                         return_dict=None, attention_mask=None, **kwargs):
        cache = kwargs.get("cache", kwargs.get("cache_params"))
        if use_cache is None:
            use_cache = self.config.use_cache if not self.training else False
        # other keyword arguments (position_ids, ...) are ignored, as transformers' MambaModel ignores them
        if cache is not None or use_cache or output_hidden_states or (input_ids is None) == (inputs_embeds is None):
            return original_backbone_forward(input_ids=input_ids, inputs_embeds=inputs_embeds, use_cache=use_cache,
                                             output_hidden_states=output_hidden_states, return_dict=return_dict,
                                             attention_mask=attention_mask, **kwargs)
        hidden = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        if cuda_only and hidden.device.type != "cuda":
            return original_backbone_forward(input_ids=input_ids, inputs_embeds=inputs_embeds, use_cache=use_cache,
                                             output_hidden_states=output_hidden_states, return_dict=return_dict,
                                             attention_mask=attention_mask, **kwargs)
        attention_mask = mask_with_padding(attention_mask)
        residual = None
        for layer in self.layers:
            # through the module call, so that wrappers' hooks run (FSDP gathers the block's sharded weights)
            hidden, residual = layer(hidden, residual, attention_mask, **{_FAST_BLOCK_KW: True})
        norm = self.norm_f
        # fp32 in, fp32 out, like transformers' final norm on its fp32 residual stream
        dtype = residual.dtype
        hidden = add_norm(hidden.to(dtype), norm.weight, residual, norm.variance_epsilon, False,
                          dtype == torch.float32)
        if return_dict is False or (return_dict is None and not self.config.return_dict):
            return (hidden,)
        from transformers.models.mamba.modeling_mamba import MambaOutput

        return MambaOutput(last_hidden_state=hidden)

    backbone.forward = types.MethodType(backbone_forward, backbone)


def mask_with_padding(attention_mask):
    """None for an all-ones mask (packed rows: nothing to mask, one multiply per layer and its backward saved;
    the check reads one flag back from the GPU), else the mask."""
    if attention_mask is not None and bool(attention_mask.all()):
        return None
    return attention_mask


_FAST_BLOCK_KW = "mamba_align_fast_block"
# transformers < 5.2x checkpoints a GradientCheckpointingLayer in its __call__ (around our forward); later
# versions wrap the class's forward, which the instance forward below replaces, so it checkpoints itself there
_CHECKPOINTS_IN_CALL = "__call__" in vars(GradientCheckpointingLayer)


def _patch_block(layer, add_norm, mixer) -> None:
    """Give one MambaBlock an instance forward that, called with `_FAST_BLOCK_KW`, runs `_layer_step` (fused add
    + norm and the mixer: (hidden, residual) in and out) and otherwise the block's own forward (generation)."""
    original = layer.forward

    def forward(self, hidden_states, *args, **kwargs):
        if not kwargs.pop(_FAST_BLOCK_KW, False):
            return original(hidden_states, *args, **kwargs)
        step = functools.partial(_layer_step, self, add_norm, mixer if self.training else None)
        if getattr(self, "gradient_checkpointing", False) and self.training and torch.is_grad_enabled() \
                and not _CHECKPOINTS_IN_CALL:
            return self._gradient_checkpointing_func(step, hidden_states, *args)
        return step(hidden_states, *args)

    layer.forward = types.MethodType(forward, layer)


def _layer_step(layer, add_norm, mixer, hidden, residual, attention_mask):
    """Block i: (fused) residual add + RMSNorm, then the mixer. Returns (mixer output, residual)."""
    normed, residual = add_norm(hidden, layer.norm.weight, residual, layer.norm.variance_epsilon, True,
                                layer.residual_in_fp32)
    if mixer is None:
        return layer.mixer(normed, attention_mask=attention_mask), residual
    return mixer(layer.mixer, normed, attention_mask), residual


def mixer_native_layout(m, hidden, attention_mask, inner_fn):
    """transformers' MambaMixer training forward (no cache), with the input projection computed as mamba_ssm
    does: xz = W_in @ X^T, a (batch, 2*d_inner, L) view with L contiguous. transformers computes
    in_proj(X).transpose(1, 2), whose last stride is 2*d_inner, and mamba_inner_fn then copies it to
    contiguous (and its gradient back) in every layer. Same arguments to `inner_fn` (mamba_inner_fn) as
    transformers passes."""
    if attention_mask is not None:
        hidden = (hidden * attention_mask[:, :, None]).to(hidden.dtype)
    batch, seqlen, _ = hidden.shape
    xz = (m.in_proj.weight @ hidden.reshape(batch * seqlen, -1).t()).view(-1, batch, seqlen).transpose(0, 1)
    if m.in_proj.bias is not None:
        xz = xz + m.in_proj.bias.to(xz.dtype)[:, None]
    return inner_fn(
        xz, m.conv1d.weight, m.conv1d.bias if m.use_conv_bias else None, m.x_proj.weight, m.dt_proj.weight,
        m.out_proj.weight, m.out_proj.bias.float() if m.use_bias else None, -torch.exp(m.A_log.float()),
        None, None, m.D.float(), delta_bias=m.dt_proj.bias.float(), delta_softplus=True)


# ------------------------------------------------------------------------------------ gradient clipping


def fused_clip_grad_norm_(parameters, optimizer, max_norm: float):
    """`torch.nn.utils.clip_grad_norm_` folded into a fused Adam/AdamW step: one pass over the gradients for the
    total norm, then the optimizer's fused kernel divides each gradient by max(1, (norm + 1e-6) / max_norm) as it
    reads it (its `grad_scale`, the hook GradScaler uses to unscale), instead of a second pass that scales every
    gradient in place (2 x the gradients' bytes of memory traffic: ~7 ms per step at the 2.8B shape on an H100).
    Same update as clipping then stepping, up to rounding. Returns the total norm before clipping, as
    clip_grad_norm_ does, or None (nothing done) where `optimizer` is not a fused torch Adam/AdamW or a GradScaler
    already uses its `grad_scale`; call it right before `optimizer.step()`, on every step."""
    fused = isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and all(
        g.get("fused") for g in optimizer.param_groups)
    if not fused or getattr(optimizer, "found_inf", None) is not None:
        return None
    norm = total_grad_norm(parameters)
    if norm is None:
        return None
    optimizer.grad_scale = torch.clamp((norm + 1e-6) / max_norm, min=1.0)
    return norm


def total_grad_norm(parameters):
    """The L2 norm of all gradients (fp32 tensor), one pass over them; None where no parameter has one."""
    grads = [p.grad for p in parameters if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads, foreach=True).float() if grads else None

"""A faster training forward for transformers' MambaForCausalLM, same checkpoint format.

`enable_fast_path(model)` patches one model instance (no new modules, no new parameters: the state dict
and `save_pretrained` / `from_pretrained` stay ordinary transformers):

- the backbone runs mamba_ssm's order of operations: the residual add of block i and the RMSNorm of block
  i+1 are one fused Triton kernel (`mamba_ssm.ops.triton.layer_norm.layer_norm_fn`, prenorm, residual kept
  in fp32), instead of transformers' separate fp32 norm, casts and add. The mixers are transformers' own
  (`mamba_inner_fn` in training), called as transformers calls them;
- `model(input_ids, labels=...)` computes the causal LM loss in row chunks straight from the last hidden
  state (`LinearCrossEntropy`): no (batch, seq, vocab) fp32 logits are materialised; it returns `logits=None`.
  TRL's own fused LM head (`fused_lm_head=True`, used by SFTTrainer / DPOTrainer) runs on top of the fast
  backbone unchanged.

Anything the fast path does not cover (a cache, `use_cache=True`, `output_hidden_states`, `logits_to_keep`,
`shift_labels`, tensors not on CUDA) goes to the original forward, so generation is unchanged.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import types

log = logging.getLogger(__name__)

_PATCH_ATTR = "_mamba_align_fast_path"


def fast_path_unavailable(model=None) -> str | None:
    """Why the fast path cannot be enabled here (for this model), or None."""
    import torch

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


def enable_fast_path(model, chunk_size: int = 4096) -> bool:
    """Patch `model` (a transformers MambaForCausalLM) to train with mamba_ssm's fused add+RMSNorm and a chunked
    LM loss. Returns False, changing nothing, where CUDA or mamba_ssm is missing. Call it before building the
    trainer (before DDP / TRL wrap the model); gradient checkpointing set later is honoured."""
    reason = fast_path_unavailable(model)
    if reason is not None:
        log.info("mamba_ssm fast path not enabled: %s", reason)
        return False
    from mamba_ssm.ops.triton.layer_norm import layer_norm_fn

    patch_model(model, functools.partial(_triton_add_rms_norm, layer_norm_fn), chunk_size, cuda_only=True)
    log.info("mamba_ssm fast path enabled (fused add+RMSNorm, chunked LM loss)")
    return True


def disable_fast_path(model) -> None:
    """Undo `enable_fast_path` / `patch_model` on this instance."""
    saved = model.__dict__.pop(_PATCH_ATTR, None)
    if saved is None:
        return
    backbone_forward, model_forward = saved
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else model.backbone
    for obj, fwd in ((backbone, backbone_forward), (model, model_forward)):
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
    import torch

    r = x if residual is None else x + residual
    r = r.float() if residual_in_fp32 else r.to(residual.dtype if residual is not None else x.dtype)
    rf = r.float()
    y = (rf * torch.rsqrt(rf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    return (y, r) if prenorm else y


# -------------------------------------------------------------------------------------------- patching


def patch_model(model, add_norm, chunk_size: int = 4096, cuda_only: bool = True) -> None:
    """Install the fast forwards with a given add+norm implementation (the Triton one, or the reference one
    in CPU tests). `cuda_only`: tensors elsewhere take the original forward."""
    import torch

    if _PATCH_ATTR in model.__dict__:
        disable_fast_path(model)
    backbone = model.backbone
    saved = (backbone.__dict__.get("forward"), model.__dict__.get("forward"))
    model.__dict__[_PATCH_ATTR] = saved
    original_backbone_forward = backbone.forward
    original_model_forward = model.forward

    @functools.wraps(type(backbone).forward)
    def backbone_forward(self, input_ids=None, inputs_embeds=None, use_cache=None, output_hidden_states=None,
                         return_dict=None, attention_mask=None, **kwargs):
        cache = kwargs.get("cache", kwargs.get("cache_params"))
        if use_cache is None:
            use_cache = self.config.use_cache if not self.training else False
        if cache is not None or use_cache or output_hidden_states or (input_ids is None) == (inputs_embeds is None) \
                or any(v is not None for k, v in kwargs.items() if k not in ("cache", "cache_params")):
            return original_backbone_forward(input_ids=input_ids, inputs_embeds=inputs_embeds, use_cache=use_cache,
                                             output_hidden_states=output_hidden_states, return_dict=return_dict,
                                             attention_mask=attention_mask, **kwargs)
        hidden = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        if cuda_only and hidden.device.type != "cuda":
            return original_backbone_forward(input_ids=input_ids, inputs_embeds=inputs_embeds, use_cache=use_cache,
                                             output_hidden_states=output_hidden_states, return_dict=return_dict,
                                             attention_mask=attention_mask, **kwargs)
        residual = None
        for layer in self.layers:
            step = functools.partial(_layer_step, layer, add_norm)
            if getattr(layer, "gradient_checkpointing", False) and self.training and torch.is_grad_enabled():
                hidden, residual = layer._gradient_checkpointing_func(step, hidden, residual, attention_mask)
            else:
                hidden, residual = step(hidden, residual, attention_mask)
        norm = self.norm_f
        # fp32 in, fp32 out, like transformers' final norm on its fp32 residual stream
        dtype = residual.dtype
        hidden = add_norm(hidden.to(dtype), norm.weight, residual, norm.variance_epsilon, False,
                          dtype == torch.float32)
        if return_dict is False or (return_dict is None and not self.config.return_dict):
            return (hidden,)
        from transformers.models.mamba.modeling_mamba import MambaOutput

        return MambaOutput(last_hidden_state=hidden)

    @functools.wraps(type(model).forward)
    def model_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                      num_items_in_batch=None, return_dict=None, logits_to_keep=0, **kwargs):
        plain = {k: v for k, v in kwargs.items() if k not in ("use_cache", "output_hidden_states")}
        if labels is None or plain or kwargs.get("use_cache") or kwargs.get("output_hidden_states") \
                or not isinstance(logits_to_keep, int) or logits_to_keep != 0:
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            return original_model_forward(input_ids=input_ids, attention_mask=attention_mask,
                                          inputs_embeds=inputs_embeds, labels=labels, return_dict=return_dict,
                                          logits_to_keep=logits_to_keep, **kwargs)
        out = self.backbone(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                            use_cache=False, return_dict=True)
        hidden = out.last_hidden_state
        if cuda_only and hidden.device.type != "cuda":
            # the backbone already ran the original path; finish exactly like transformers
            logits = self.lm_head(hidden.to(self.lm_head.weight.dtype)).float()
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size,
                                      num_items_in_batch=num_items_in_batch)
        else:
            loss = causal_lm_loss(hidden, self.lm_head.weight, labels, num_items_in_batch, chunk_size)
        from transformers.models.mamba.modeling_mamba import MambaCausalLMOutput

        if return_dict is False or (return_dict is None and not self.config.return_dict):
            return (loss,)
        return MambaCausalLMOutput(loss=loss, logits=None)

    backbone.forward = types.MethodType(backbone_forward, backbone)
    model.forward = types.MethodType(model_forward, model)


def _layer_step(layer, add_norm, hidden, residual, attention_mask):
    """Block i: (fused) residual add + RMSNorm, then transformers' mixer. Returns (mixer output, residual)."""
    normed, residual = add_norm(hidden, layer.norm.weight, residual, layer.norm.variance_epsilon, True,
                                layer.residual_in_fp32)
    return layer.mixer(normed, attention_mask=attention_mask), residual


# ----------------------------------------------------------------------------------------- chunked loss


def causal_lm_loss(hidden, weight, labels, num_items_in_batch=None, chunk_size: int = 4096):
    """transformers' causal LM loss (shift by one, ignore -100, sum / num_items_in_batch or mean) from the last
    hidden state and the LM head weight, without the full logits. Only positions with a label are projected."""
    import torch

    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].to(hidden.device).reshape(-1)
    valid = y != -100
    h, y = h[valid], y[valid]
    total = LinearCrossEntropy.apply(h, weight, y, chunk_size)
    if num_items_in_batch is None:
        return total / valid.sum().clamp(min=1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


class _LinearCrossEntropyFn:
    pass


def _compute_dtype(hidden, weight):
    import torch

    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return weight.dtype


def _make_linear_ce():
    import torch

    class LinearCrossEntropy(torch.autograd.Function):
        """sum over rows of cross_entropy(hidden @ weight.T, labels), `chunk_size` rows at a time.

        The logits of a chunk are computed in the autocast dtype (as the model's `lm_head` would under
        autocast), reduced in fp32, and discarded; the gradients are computed in the same pass (softmax minus
        one-hot, in the autocast dtype for the two matrix products) and scaled in backward, so nothing of size
        (rows, vocab) is kept for backward. The weight gradient is accumulated over chunks in fp32."""

        @staticmethod
        def forward(ctx, hidden, weight, labels, chunk_size):
            need_h = hidden.requires_grad and torch.is_grad_enabled() or ctx.needs_input_grad[0]
            need_w = ctx.needs_input_grad[1]
            cdtype = _compute_dtype(hidden, weight)
            n = hidden.shape[0]
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            with torch.autocast(hidden.device.type, enabled=False):
                w = weight.to(cdtype)
                for start in range(0, n, chunk_size):
                    h = hidden[start : start + chunk_size].to(cdtype)
                    y = labels[start : start + chunk_size]
                    logits = (h @ w.t()).float()
                    lse = torch.logsumexp(logits, dim=-1)
                    total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
                    if grad_h is None and grad_w is None:
                        continue
                    probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                    probs[torch.arange(len(y), device=y.device), y] -= 1.0
                    g = probs.to(cdtype)
                    del logits, probs
                    if grad_h is not None:
                        grad_h[start : start + chunk_size] = (g @ w).to(grad_h.dtype)
                    if grad_w is not None:
                        grad_w += (g.t() @ h).float()
            del need_h
            ctx.save_for_backward(grad_h, grad_w)
            ctx.weight_dtype = weight.dtype
            return total

        @staticmethod
        def backward(ctx, grad_total):
            grad_h, grad_w = ctx.saved_tensors
            gh = None if grad_h is None else grad_h * grad_total.to(grad_h.dtype)
            gw = None if grad_w is None else (grad_w * grad_total).to(ctx.weight_dtype)
            return gh, gw, None, None

    return LinearCrossEntropy


class _Lazy:
    """`LinearCrossEntropy` is built on first use so that importing this module does not import torch."""

    def __getattr__(self, name):
        global LinearCrossEntropy
        LinearCrossEntropy = _make_linear_ce()
        return getattr(LinearCrossEntropy, name)


LinearCrossEntropy = _Lazy()

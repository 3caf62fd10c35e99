"""The training fast path: on CPU with the plain-PyTorch add+norm (the patched forward's logic, checkpoint
format, composition with TRL's fused LM head); on the GPU with mamba_ssm's Triton kernel (marked `gpu`)."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from mamba_align.train import fast

HAS_GPU_KIT = torch.cuda.is_available() and importlib.util.find_spec("mamba_ssm") is not None
gpu = pytest.mark.skipif(not HAS_GPU_KIT, reason="needs CUDA and mamba_ssm")


def tiny_model(seed=0, **overrides):
    from transformers import MambaConfig, MambaForCausalLM

    kw = dict(hidden_size=64, num_hidden_layers=3, vocab_size=101, state_size=8, expand=2, conv_kernel=4,
              time_step_rank=6, use_mambapy=True)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = MambaForCausalLM(MambaConfig(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.train()


def batch(vocab=101, b=3, length=17, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, length), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt
    labels[2, -4:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[2, -4:] = 0
    return ids, labels, mask


def loss_and_grads(model, ids, labels, mask, **kw):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels, **kw).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(got, ref, rtol):
    assert got.keys() == ref.keys()
    for name in ref:
        err = (got[name] - ref[name]).norm() / ref[name].norm().clamp(min=1e-12)
        assert err < rtol, f"{name}: relative gradient error {err:.2e}"


# ------------------------------------------------------------------------------------------------- CPU


def test_enable_fast_path_is_a_no_op_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    model = tiny_model()
    assert fast.enable_fast_path(model) is False
    assert "forward" not in model.__dict__ and "forward" not in model.backbone.__dict__


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("residual_in_fp32", [True, False])
def test_patched_forward_equals_transformers(checkpointing, residual_in_fp32):
    """Fused-order add+norm (here in plain PyTorch) gives transformers' loss and gradients."""
    ref = tiny_model(residual_in_fp32=residual_in_fp32)
    model = copy.deepcopy(ref)
    fast.patch_model(model, fast.reference_add_rms_norm, cuda_only=False)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, labels, mask = batch()
    ref_loss, ref_grads = loss_and_grads(ref, ids, labels, mask)
    loss, grads = loss_and_grads(model, ids, labels, mask)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, ref_grads, 1e-4)
    assert len(grads) == len(list(model.parameters()))  # every parameter got a gradient


def test_patched_model_keeps_the_checkpoint_format(tmp_path):
    from transformers import MambaForCausalLM

    ref = tiny_model()
    model = copy.deepcopy(ref)
    fast.patch_model(model, fast.reference_add_rms_norm, cuda_only=False)
    assert list(model.state_dict()) == list(ref.state_dict())
    model.save_pretrained(tmp_path)
    loaded = MambaForCausalLM.from_pretrained(tmp_path)
    assert "forward" not in loaded.__dict__  # a plain transformers model again
    for (n, a), (_, b) in zip(loaded.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), n


def test_paths_the_fast_path_does_not_cover_are_the_original():
    ref = tiny_model().eval()
    model = copy.deepcopy(ref)
    fast.patch_model(model, fast.reference_add_rms_norm, cuda_only=False)
    ids, _, _ = batch()
    with torch.no_grad():
        # logits without labels, and generation (cache): the original forward
        torch.testing.assert_close(model(ids).logits, ref(ids).logits)
        gen = model.generate(ids[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(gen, ref.generate(ids[:1], max_new_tokens=5, do_sample=False, pad_token_id=0))
        # the backbone's fast path gives the same last hidden state as the original one
        h = model.backbone(ids, use_cache=False).last_hidden_state
        torch.testing.assert_close(h, ref.backbone(ids, use_cache=False).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_an_all_ones_mask_is_not_applied():
    """Packed rows carry an all-ones attention mask: the mixers get none (no multiply per layer); a mask with
    zeros still reaches them."""
    model = tiny_model()
    fast.patch_model(model, fast.reference_add_rms_norm, cuda_only=False)
    seen = []
    for layer in model.backbone.layers:
        layer.mixer.forward = (lambda f: lambda h, attention_mask=None, **kw: (seen.append(attention_mask),
                                                                               f(h, attention_mask=attention_mask,
                                                                                 **kw))[1])(layer.mixer.forward)
    ids, labels, mask = batch()
    model(input_ids=ids, attention_mask=torch.ones_like(mask), labels=labels)
    assert seen == [None] * 3
    seen.clear()
    model(input_ids=ids, attention_mask=mask, labels=labels)
    assert all(m is mask for m in seen) and len(seen) == 3


def _two_models_and_optimizers(fused=True):
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4))
    b = copy.deepcopy(a)
    return a, b, torch.optim.AdamW(a.parameters(), lr=1e-2, fused=fused), \
        torch.optim.AdamW(b.parameters(), lr=1e-2, fused=fused)


def test_clipping_inside_the_fused_adamw_step_equals_clipping_first():
    ref, model, ref_opt, opt = _two_models_and_optimizers()
    for step in range(6):  # norms far above and below max_norm
        x = torch.randn(8, 16) * (10.0 if step % 2 else 0.01)
        for m in (ref, model):
            m(x).pow(2).sum().backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        norm = fast.fused_clip_grad_norm_(model.parameters(), opt, 1.0)
        torch.testing.assert_close(norm, ref_norm)
        ref_opt.step(), opt.step()
        ref_opt.zero_grad(), opt.zero_grad()
    for a, b in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_fused_clipping_leaves_other_optimizers_to_clip_grad_norm():
    _, model, _, opt = _two_models_and_optimizers(fused=False)
    model(torch.randn(2, 16)).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    assert fast.fused_clip_grad_norm_(model.parameters(), opt, 1e-3) is None
    assert fast.fused_clip_grad_norm_(model.parameters(), torch.optim.RMSprop(model.parameters()), 1e-3) is None
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), before))
    assert not hasattr(opt, "grad_scale")


def test_disable_fast_path_restores_the_instance():
    model = tiny_model()
    fast.patch_model(model, fast.reference_add_rms_norm, cuda_only=False)
    assert "forward" in model.backbone.__dict__ and all("forward" in b.__dict__ for b in model.backbone.layers)
    fast.disable_fast_path(model)
    assert "forward" not in model.__dict__ and "forward" not in model.backbone.__dict__
    assert not any("forward" in b.__dict__ for b in model.backbone.layers)


def test_trl_fused_lm_head_runs_on_the_fast_backbone():
    """SFTTrainer / DPOTrainer call `model(..., labels=..., fused_lm_head=True)`, which runs `model.backbone`:
    patched or not, same log-probs and gradients."""
    from trl.trainer.utils import add_fused_lm_head

    ref = tiny_model()
    model = copy.deepcopy(ref)
    fast.patch_model(model, fast.reference_add_rms_norm, cuda_only=False)
    add_fused_lm_head(ref)
    add_fused_lm_head(model)
    ids, labels, mask = batch()
    ref_loss, ref_grads = loss_and_grads(ref, ids, labels, mask, fused_lm_head=True, use_cache=False)
    loss, grads = loss_and_grads(model, ids, labels, mask, fused_lm_head=True, use_cache=False)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, ref_grads, 1e-4)


def test_native_mixer_layout_feeds_mamba_inner_fn_what_transformers_does():
    """Same xz values as transformers' in_proj(x).transpose(1, 2), but with the sequence contiguous, and the
    same other arguments."""
    m = tiny_model(use_bias=True).backbone.layers[0].mixer
    hidden = torch.randn(2, 9, 64)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, -3:] = 0
    seen = {}

    def inner(xz, *args, **kw):
        seen["xz"], seen["args"], seen["kw"] = xz, args, kw
        return torch.zeros(2, 9, 64)

    fast.mixer_native_layout(m, hidden, mask, inner)
    expected = m.in_proj(hidden * mask[:, :, None]).transpose(1, 2)
    torch.testing.assert_close(seen["xz"], expected, rtol=1e-6, atol=1e-6)
    assert seen["xz"].stride(-1) == 1 and expected.stride(-1) != 1
    assert seen["args"][0] is m.conv1d.weight and seen["args"][2] is m.x_proj.weight
    torch.testing.assert_close(seen["args"][6], -torch.exp(m.A_log.float()))
    assert seen["kw"] == dict(delta_bias=seen["kw"]["delta_bias"], delta_softplus=True)


def test_reference_add_rms_norm_is_transformers_block_math():
    from transformers.models.mamba.modeling_mamba import MambaRMSNorm

    torch.manual_seed(0)
    norm = MambaRMSNorm(32, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x, r = torch.randn(4, 32), torch.randn(4, 32)
    y, res = fast.reference_add_rms_norm(x, norm.weight, r, 1e-5, True, True)
    torch.testing.assert_close(res, x + r)
    torch.testing.assert_close(y, norm(x + r))


# ------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@gpu
def test_gpu_triton_add_norm_equals_reference():
    from mamba_ssm.ops.triton.layer_norm import layer_norm_fn

    torch.manual_seed(0)
    w = torch.rand(256, device="cuda") + 0.5
    for xdt in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 50, 256, device="cuda", dtype=xdt)
        r = torch.randn(3, 50, 256, device="cuda")
        y, res = fast._triton_add_rms_norm(layer_norm_fn, x, w, r, 1e-5, True, True)
        ry, rres = fast.reference_add_rms_norm(x, w, r, 1e-5, True, True)
        assert y.dtype == ry.dtype == xdt and res.dtype == torch.float32
        torch.testing.assert_close(res, rres)
        tol = 1e-5 if xdt == torch.float32 else 1e-2
        torch.testing.assert_close(y, ry, rtol=tol, atol=tol)


def _gpu_models(native_mixer_layout=True, save_mixer_activations=True, **overrides):
    ref = tiny_model(hidden_size=256, num_hidden_layers=4, vocab_size=1000, state_size=16, time_step_rank=16,
                     use_mambapy=False, **overrides).cuda()
    model = copy.deepcopy(ref)
    assert fast.enable_fast_path(model, native_mixer_layout=native_mixer_layout,
                                 save_mixer_activations=save_mixer_activations) is True
    return ref, model


def _gpu_batch():
    ids, labels, mask = batch(vocab=1000, b=3, length=256)
    return ids.cuda(), labels.cuda(), mask.cuda()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("native_mixer_layout,save_mixer_activations", [(False, False), (True, False), (True, True)])
def test_gpu_fast_path_fp32_equals_reference(checkpointing, native_mixer_layout, save_mixer_activations):
    ref, model = _gpu_models(native_mixer_layout, save_mixer_activations)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, labels, mask = _gpu_batch()
    ref_loss, ref_grads = loss_and_grads(ref, ids, labels, mask)
    loss, grads = loss_and_grads(model, ids, labels, mask)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    assert_grads_close(grads, ref_grads, 1e-3)


@pytest.mark.gpu
@gpu
def test_gpu_fast_path_bf16_autocast_is_as_close_to_fp32_as_the_reference():
    """Under bf16 autocast both paths round; the fast path must be no further from the fp32 result than the
    reference path is (x1.5 + a floor), and close to the reference itself."""
    ref, model = _gpu_models()
    ids, labels, mask = _gpu_batch()
    exact_loss, exact_grads = loss_and_grads(ref, ids, labels, mask)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref_loss, ref_grads = loss_and_grads(ref, ids, labels, mask)
        loss, grads = loss_and_grads(model, ids, labels, mask)
    assert abs(loss - exact_loss) <= 1.5 * abs(ref_loss - exact_loss) + 2e-3 * abs(exact_loss)
    assert abs(loss - ref_loss) <= 5e-3 * abs(ref_loss)
    for name in exact_grads:
        e_ref = ((ref_grads[name] - exact_grads[name]).norm() / exact_grads[name].norm()).item()
        e_fast = ((grads[name] - exact_grads[name]).norm() / exact_grads[name].norm()).item()
        assert e_fast <= 1.5 * e_ref + 5e-3, f"{name}: fast {e_fast:.2e} vs reference {e_ref:.2e}"


@pytest.mark.gpu
@gpu
def test_gpu_fast_path_under_trl_fused_head():
    from trl.trainer.utils import add_fused_lm_head

    ref, model = _gpu_models()
    add_fused_lm_head(ref)
    add_fused_lm_head(model)
    ids, labels, mask = _gpu_batch()
    ref_loss, ref_grads = loss_and_grads(ref, ids, labels, mask, fused_lm_head=True, use_cache=False)
    loss, grads = loss_and_grads(model, ids, labels, mask, fused_lm_head=True, use_cache=False)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    assert_grads_close(grads, ref_grads, 1e-3)

"""The mamba_ssm <-> transformers mapping (model/mapping.py): configs, key names and state dicts survive a
round trip either way, and a transformers model's own tensors and keys are what the mapping expects."""

from __future__ import annotations

import json

import pytest
import torch

from mamba_align.model import mapping as M
from mamba_align.testing.demo import build_tiny_mamba_ssm_checkpoint
from mamba_align.utils import UserError

MIXER_FIELDS = ("hidden_size", "num_hidden_layers", "vocab_size", "state_size", "conv_kernel", "expand",
                "time_step_rank", "intermediate_size", "use_conv_bias", "use_bias", "residual_in_fp32",
                "tie_word_embeddings")


@pytest.fixture(scope="module")
def ssm_checkpoint(tmp_path_factory):
    """A mamba_ssm-format checkpoint (vocab 301, padded to 304 rows; tied) as (state dict, config)."""
    path = build_tiny_mamba_ssm_checkpoint(tmp_path_factory.mktemp("ssm") / "m", d_model=32, n_layer=2)
    return (torch.load(path / "pytorch_model.bin", weights_only=True),
            json.loads((path / "config.json").read_text()))


def untied(sd):
    sd = dict(sd)
    sd["lm_head.weight"] = sd["lm_head.weight"].clone() * 2
    return sd


@pytest.mark.parametrize("tie", [True, False])
def test_state_dict_round_trip_ssm_to_hf_to_ssm(ssm_checkpoint, tie):
    sd = ssm_checkpoint[0] if tie else untied(ssm_checkpoint[0])
    hf = M.mamba_ssm_to_hf_state_dict(sd, tie)
    assert "backbone.embeddings.weight" in hf and not any(k.startswith("backbone.embedding.") for k in hf)
    assert ("lm_head.weight" in hf) == (not tie)  # as transformers saves a tied model
    back = M.hf_to_mamba_ssm_state_dict(hf, tie)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_state_dict_keys_are_those_of_the_transformers_model(ssm_checkpoint):
    """The renamed keys are exactly MambaForCausalLM's, with its shapes; loading them is strict-clean."""
    from transformers import MambaForCausalLM

    sd, cfg = ssm_checkpoint
    hf_config = M.hf_config_from_ssm(cfg)
    model = MambaForCausalLM(hf_config)
    model.load_state_dict(M.mamba_ssm_to_hf_state_dict(sd, True), strict=False)
    own = model.state_dict()
    hf = M.mamba_ssm_to_hf_state_dict(sd, True)
    assert set(own) - set(hf) == {"lm_head.weight"} and set(hf) <= set(own)  # lm_head: the tied embedding
    assert all(torch.equal(own[k], hf[k]) for k in hf)
    assert {M.to_ssm_key(k): tuple(v.shape) for k, v in own.items() if k != "lm_head.weight"} == \
        M.expected_ssm_shapes(hf_config)
    assert all(M.to_hf_key(M.to_ssm_key(k)) == k for k in own)


def test_canonical_state_dict_is_the_same_from_either_format(ssm_checkpoint):
    sd, cfg = ssm_checkpoint
    hf_config = M.hf_config_from_ssm(cfg)
    shapes = M.expected_ssm_shapes(hf_config)
    from_ssm = M.canonical_ssm_state_dict(sd, shapes, True, "ssm")
    from_hf = M.canonical_ssm_state_dict(M.mamba_ssm_to_hf_state_dict(sd, True), shapes, True, "hf")
    assert list(from_ssm) == list(from_hf) == list(shapes)
    assert all(torch.equal(from_ssm[k], from_hf[k]) for k in shapes)


def test_config_round_trip_ssm_to_hf_to_ssm(ssm_checkpoint):
    _, cfg = ssm_checkpoint
    back = M.mamba_ssm_config_from_hf(M.hf_config_from_ssm(cfg))
    # mamba_ssm pads the vocabulary itself; the transformers config holds the padded rows
    assert back["vocab_size"] == M.padded_vocab_size(cfg["vocab_size"], cfg["pad_vocab_size_multiple"]) == 304
    assert back["pad_vocab_size_multiple"] == 1
    assert back["ssm_cfg"] == {"layer": "Mamba1", "d_state": 16, "d_conv": 4, "expand": 2, "dt_rank": 2,
                               "conv_bias": True, "bias": False}  # mamba_ssm's defaults, made explicit
    same = {k: cfg[k] for k in ("d_model", "d_intermediate", "n_layer", "rms_norm", "residual_in_fp32",
                                "fused_add_norm", "tie_embeddings")}
    assert {k: back[k] for k in same} == same
    # a config in that normal form comes back unchanged
    assert M.mamba_ssm_config_from_hf(M.hf_config_from_ssm(back)) == back


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": False, "use_bias": True,
                                             "use_conv_bias": False, "residual_in_fp32": False}])
def test_config_round_trip_hf_to_ssm_to_hf(overrides):
    from transformers import MambaConfig

    hf = MambaConfig(hidden_size=48, num_hidden_layers=3, vocab_size=96, state_size=8, expand=2, conv_kernel=3,
                     time_step_rank=5, layer_norm_epsilon=1e-6, **overrides)
    back = M.hf_config_from_ssm(M.mamba_ssm_config_from_hf(hf), eps=hf.layer_norm_epsilon)
    assert {f: getattr(back, f) for f in MIXER_FIELDS} == {f: getattr(hf, f) for f in MIXER_FIELDS}
    assert back.layer_norm_epsilon == 1e-6


def test_read_config_and_state_dict_of_a_saved_transformers_model(ssm_checkpoint, tmp_path):
    """A folder saved by transformers (single file and sharded) reads back as the mamba_ssm state dict."""
    from transformers import MambaForCausalLM

    sd, cfg = ssm_checkpoint
    model = MambaForCausalLM(M.hf_config_from_ssm(cfg))
    model.load_state_dict(M.mamba_ssm_to_hf_state_dict(sd, True), strict=False)
    for name, shard in (("single", "1GB"), ("sharded", "40KB")):
        model.save_pretrained(tmp_path / name, max_shard_size=shard)
        fmt, ssm_cfg, eps = M.read_config(tmp_path / name / "config.json")
        assert (fmt, eps) == ("transformers", 1e-5) and ssm_cfg == M.mamba_ssm_config_from_hf(model.config)
        got = M.hf_to_mamba_ssm_state_dict(M.read_checkpoint_state_dict(tmp_path / name), True)
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    with pytest.raises(UserError, match="no weights found"):
        M.read_checkpoint_state_dict(tmp_path / "nothing-here")

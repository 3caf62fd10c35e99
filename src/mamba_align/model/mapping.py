"""The one mapping between mamba_ssm's Mamba-1 checkpoints and transformers' `MambaForCausalLM`.

Used both ways: model/convert.py turns a mamba_ssm (or transformers) checkpoint into a transformers folder;
eval/engine/ssm.py loads a transformers folder into mamba_ssm's `MambaLMHeadModel` for fast decoding.

- Configs: `hf_config_from_ssm` (mamba_ssm dict -> transformers `MambaConfig`, vocabulary padded as
  mamba_ssm pads it), `mamba_ssm_config_from_hf` (back; `pad_vocab_size_multiple=1` keeps exactly the
  checkpoint's rows), `read_config` (a config.json of either format).
- Keys: the two formats differ only in the embedding's name (`backbone.embedding.` in mamba_ssm,
  `backbone.embeddings.` in transformers), and in tied embeddings: transformers' files leave the tied
  `lm_head.weight` out, mamba_ssm's state dict lists the embedding under both names.
- Weights: `read_checkpoint_state_dict` / `load_weights` read a folder's tensors (safetensors, single or
  sharded, or pytorch_model.bin); `canonical_ssm_state_dict` checks them against the config's shapes.

Functions that read files raise UserError naming the file; those that map objects in memory raise ValueError.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mamba_align.model.tokenizer import BOS_ID, EOS_ID, PAD_ID
from mamba_align.utils import UserError

# mamba_ssm's MambaConfig fields, and the Mamba-1 mixer options that matter for inference.
SSM_CONFIG_KEYS = {"d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx",
                   "attn_cfg", "rms_norm", "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple",
                   "tie_embeddings"}
SSM_MIXER_KEYS = {"d_state": "state_size", "d_conv": "conv_kernel", "expand": "expand",
                  "dt_rank": "time_step_rank", "conv_bias": "use_conv_bias", "bias": "use_bias"}
SSM_INIT_ONLY_KEYS = {"layer", "dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor", "use_fast_path"}

SSM_EMBEDDING, HF_EMBEDDING = "backbone.embedding.", "backbone.embeddings."


# ---------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------

def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    return vocab_size + (-vocab_size) % multiple


def read_config(path: Path) -> tuple[str, dict, float]:
    """Return (format, mamba_ssm-style config dict, norm epsilon) for a config.json of either format."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read config: {e}") from e
    if raw.get("model_type") == "mamba":
        from transformers import MambaConfig

        try:
            ssm = mamba_ssm_config_from_hf(MambaConfig.from_dict(raw))
        except ValueError as e:
            raise UserError(f"{path}: {e}") from e
        return "transformers", ssm, float(raw.get("layer_norm_epsilon", 1e-5))
    if "model_type" in raw:
        raise UserError(f"{path}: model_type {raw['model_type']!r} is not supported; expected 'mamba' "
                        "(transformers Mamba-1) or a mamba_ssm config with d_model, n_layer, ...")
    if not {"d_model", "n_layer"} <= raw.keys():
        raise UserError(f"{path}: neither a transformers Mamba config (model_type 'mamba') nor a mamba_ssm "
                        "config (d_model, n_layer, vocab_size, ssm_cfg, ...)")
    _check_ssm_config(raw, path)
    return "mamba_ssm", raw, 1e-5  # mamba_ssm's MixerModel always uses norm_epsilon 1e-5


def _check_ssm_config(cfg: dict, path: Path) -> None:
    """UserError unless `cfg` (read from `path`) is a pure Mamba-1 mamba_ssm config transformers can hold."""
    unknown = sorted(cfg.keys() - SSM_CONFIG_KEYS)
    if unknown:
        raise UserError(f"{path}: unknown mamba_ssm config keys {unknown}; expected some of {sorted(SSM_CONFIG_KEYS)}")
    if "vocab_size" not in cfg:
        raise UserError(f"{path}: missing key vocab_size")
    if not cfg.get("rms_norm", True):
        raise UserError(f"{path}: rms_norm is false (LayerNorm); transformers' Mamba only has RMSNorm (MambaRMSNorm)")
    if cfg.get("d_intermediate", 0) or cfg.get("attn_layer_idx"):
        raise UserError(f"{path}: d_intermediate / attn_layer_idx are set (MLP or attention layers); "
                        "only pure Mamba-1 models can be converted")
    ssm_cfg = cfg.get("ssm_cfg") or {}
    if ssm_cfg.get("layer", "Mamba1") != "Mamba1":
        raise UserError(f"{path}: ssm_cfg.layer is {ssm_cfg['layer']!r}; only Mamba1 is supported")
    unknown = sorted(ssm_cfg.keys() - SSM_MIXER_KEYS.keys() - SSM_INIT_ONLY_KEYS)
    if unknown:
        raise UserError(f"{path}: unknown ssm_cfg keys {unknown}")


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


def hf_config_from_ssm(cfg: dict, eps: float = 1e-5):
    """transformers MambaConfig for a mamba_ssm config dict (vocab padded, eos 0 / bos 0 / pad 1)."""
    from transformers import MambaConfig

    mixer = {hf_key: cfg["ssm_cfg"][k] for k, hf_key in SSM_MIXER_KEYS.items() if k in (cfg.get("ssm_cfg") or {})}
    config = MambaConfig(
        vocab_size=padded_vocab_size(cfg["vocab_size"], cfg.get("pad_vocab_size_multiple", 8)),
        hidden_size=cfg["d_model"], num_hidden_layers=cfg["n_layer"], layer_norm_epsilon=eps,
        residual_in_fp32=cfg.get("residual_in_fp32", True), tie_word_embeddings=cfg.get("tie_embeddings", True),
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        **{"state_size": 16, "conv_kernel": 4, "expand": 2, "time_step_rank": "auto",
           "use_conv_bias": True, "use_bias": False, **mixer},
    )
    config.architectures = ["MambaForCausalLM"]
    config.dtype = "float32"
    return config


# ---------------------------------------------------------------------------------------------------
# Keys and state dicts
# ---------------------------------------------------------------------------------------------------

def to_ssm_key(key: str) -> str:
    return SSM_EMBEDDING + key[len(HF_EMBEDDING):] if key.startswith(HF_EMBEDDING) else key


def to_hf_key(key: str) -> str:
    return HF_EMBEDDING + key[len(SSM_EMBEDDING):] if key.startswith(SSM_EMBEDDING) else key


def expected_ssm_shapes(hf_config) -> dict[str, tuple[int, ...]]:
    """Tensor shapes a checkpoint must have, under mamba_ssm's key names (from a weightless model).
    With tied embeddings there is no separate `lm_head.weight`."""
    from transformers import MambaForCausalLM

    with torch.device("meta"):
        model = MambaForCausalLM(hf_config)
    shapes = {to_ssm_key(k): tuple(v.shape) for k, v in model.state_dict().items()}
    if hf_config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def hf_to_mamba_ssm_state_dict(state_dict: dict, tie_embeddings: bool) -> dict:
    """Rename a transformers MambaForCausalLM state dict to mamba_ssm's MambaLMHeadModel keys.

    With tied embeddings, `lm_head.weight` is the embedding (transformers' save_pretrained leaves the tied
    copy out; mamba_ssm's state dict lists it under both names)."""
    out = {to_ssm_key(key): value for key, value in state_dict.items()}
    if tie_embeddings:
        out["lm_head.weight"] = out[SSM_EMBEDDING + "weight"]
    elif "lm_head.weight" not in out:
        raise ValueError("tie_word_embeddings is false but the checkpoint has no lm_head.weight")
    return out


def mamba_ssm_to_hf_state_dict(state_dict: dict, tie_embeddings: bool) -> dict:
    """Rename a mamba_ssm state dict to transformers' keys, as transformers saves it: with tied embeddings
    without `lm_head.weight`."""
    return {to_hf_key(k): v for k, v in state_dict.items() if not (tie_embeddings and k == "lm_head.weight")}


def canonical_ssm_state_dict(sd: dict[str, torch.Tensor], shapes: dict, tied: bool, where: str) -> dict:
    """Source weights of either format -> fp32, mamba_ssm key names, in the order of `shapes`
    (expected_ssm_shapes: no lm_head when tied); UserError naming `where` if they do not fit the config."""
    sd = {to_ssm_key(k): v for k, v in sd.items()}
    if tied and "lm_head.weight" in sd:
        lm_head = sd.pop("lm_head.weight")
        embedding = sd.get(SSM_EMBEDDING + "weight")
        if embedding is not None and lm_head.shape == embedding.shape and not torch.equal(lm_head, embedding):
            raise UserError(f"{where}: embeddings are tied in the config but lm_head.weight differs from "
                            "the embedding")
    missing = sorted(shapes.keys() - sd.keys())
    unexpected = sorted(sd.keys() - shapes.keys())
    if missing or unexpected:
        raise UserError(f"{where}: weights do not match config.json: missing {missing[:5]}"
                        f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                        f"{' ...' if len(unexpected) > 5 else ''}")
    for key, shape in shapes.items():
        if tuple(sd[key].shape) != shape:
            raise UserError(f"{where}: tensor {key} has shape {tuple(sd[key].shape)}, but config.json implies {shape}")
        if not sd[key].is_floating_point():
            raise UserError(f"{where}: tensor {key} has dtype {sd[key].dtype}; expected floating point")
    return {k: sd[k].float().contiguous() for k in shapes}  # keep the config's order


# ---------------------------------------------------------------------------------------------------
# Reading weights
# ---------------------------------------------------------------------------------------------------

def weight_patterns(files: list[str], fmt: str, where: str) -> list[str]:
    """Which of a checkpoint's `files` hold its weights (safetensors preferred); UserError if none.
    A sharded checkpoint gives its index first, then a pattern for the shards."""
    if fmt == "transformers" and "model.safetensors.index.json" in files:
        return ["model.safetensors.index.json", "model-*.safetensors"]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if name in files:
            return [name]
    raise UserError(f"{where}: no weights found (expected model.safetensors or pytorch_model.bin"
                    f"{' or a sharded model.safetensors.index.json' if fmt == 'transformers' else ''})")


def load_weights(directory: Path, patterns: list[str]) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """The tensors of the files `weight_patterns` chose, on the CPU, and the files read."""
    from safetensors.torch import load_file

    if patterns[0] == "model.safetensors.index.json":
        index = json.loads((directory / patterns[0]).read_text())
        files = [directory / f for f in sorted(set(index["weight_map"].values()))]
    else:
        files = [directory / patterns[0]]
    state_dict: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise UserError(f"{f}: weights file missing")
        if f.suffix == ".safetensors":
            state_dict.update(load_file(f))
        else:  # mmap: a 2.8B model is 11 GB; don't hold it twice
            state_dict.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
    return state_dict, files


def read_checkpoint_state_dict(model_dir: str | Path) -> dict:
    """All tensors of a transformers checkpoint folder (safetensors, single file or sharded, else
    pytorch_model.bin), on the CPU, under transformers' key names."""
    model_dir = Path(model_dir)
    files = [p.name for p in model_dir.iterdir()] if model_dir.is_dir() else []
    return load_weights(model_dir, weight_patterns(files, "transformers", str(model_dir)))[0]

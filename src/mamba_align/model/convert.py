"""Prepare the base model: a Mamba-1 checkpoint (mamba_ssm's format or transformers') -> a transformers
`MambaForCausalLM` directory (fp32 safetensors, config, generation config, tokenizer with chat template),
checked against an independent reference forward (model/reference.py) and described in a JSON report.

Order of work, so that bad input fails before the expensive parts: chat template name -> config.json
(a few KB) -> tokenizer (a few MB) -> weights (GBs) -> shapes -> write -> verify.

Verification runs the written checkpoint with transformers on CPU (mambapy's parallel scan) and the
source weights with reference.forward, on a short fixed prompt (VERIFY_PROMPT_TOKENS tokens, then
VERIFY_NEW_TOKENS greedy tokens). Measured max |dlogit|: ~1e-7..1e-6 on tiny CPU models. For a 2.8B model
it needs ~24 GB of RAM (source + converted copy) and, by estimate, minutes of CPU; pass verify=False
(CLI: --no-verify) to skip it. bench/verify_conversion_gpu.py checks the 2.8B shape on a GPU against
mamba_ssm's kernels (H100: max |dlogit| 3e-5, greedy identical).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time
from pathlib import Path

import torch

from mamba_align.utils import (
    UserError,
    atomic_path,
    setup_logging,
    sha256_file,
    write_json,
)

log = logging.getLogger(__name__)

# Chat templates by name. "zephyr" is HuggingFaceH4/zephyr-7b-beta's template (as alignment-handbook
# ships it); it uses the tokenizer's eos token, here <|endoftext|>, where zephyr has </s>.
CHAT_TEMPLATES = {
    "zephyr": (
        "{% for message in messages %}\n"
        "{% if message['role'] == 'user' %}\n"
        "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
        "{% elif message['role'] == 'system' %}\n"
        "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
        "{% elif message['role'] == 'assistant' %}\n"
        "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
        "{% endif %}\n"
        "{% if loop.last and add_generation_prompt %}\n"
        "{{ '<|assistant|>' }}\n"
        "{% endif %}\n"
        "{% endfor %}"
    ),
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")

# GPT-NeoX tokenizer conventions (EleutherAI/gpt-neox-20b), used by all state-spaces Mamba models.
EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|padding|>"
BOS_ID, EOS_ID, PAD_ID = 0, 0, 1

VERIFY_PROMPT = "The quick brown fox jumps over the lazy dog. A state space model reads one token at a time"
VERIFY_PROMPT_TOKENS = 16
VERIFY_NEW_TOKENS = 8
VERIFY_ATOL = 1e-3  # fp32 logits; measured: ~1e-6 on tiny CPU models, 3e-5 at 2.8B shape on an H100

# mamba_ssm's MambaConfig fields, and the Mamba-1 mixer options that matter for inference.
SSM_CONFIG_KEYS = {"d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx",
                   "attn_cfg", "rms_norm", "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple",
                   "tie_embeddings"}
SSM_MIXER_KEYS = {"d_state": "state_size", "d_conv": "conv_kernel", "expand": "expand",
                  "dt_rank": "time_step_rank", "conv_bias": "use_conv_bias", "bias": "use_bias"}
SSM_INIT_ONLY_KEYS = {"layer", "dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor", "use_fast_path"}
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json"]
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


# ---------------------------------------------------------------------------------------------------
# Finding the source: a local directory or a pinned Hub revision
# ---------------------------------------------------------------------------------------------------

def _hub_call(src: "_Source", fn, *args, **kwargs):
    """Run a huggingface_hub call; turn its errors into UserErrors that name the repo and revision."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what, repo_id, revision = src.what, src.name, src.revision
    try:
        return fn(*args, **kwargs)
    except GatedRepoError as e:
        raise UserError(f"{what} {repo_id!r} is gated: accept its terms on the Hub and set HF_TOKEN") from e
    except RepositoryNotFoundError as e:
        raise UserError(f"{what} {repo_id!r}: repository not found on the Hugging Face Hub "
                        f"(RepositoryNotFoundError; a private repo needs HF_TOKEN)") from e
    except RevisionNotFoundError as e:
        raise UserError(f"{what} {repo_id!r}: revision {revision!r} not found (RevisionNotFoundError)") from e
    except (HfHubHTTPError, OSError) as e:
        raise UserError(f"{what} {repo_id}@{revision}: Hub request failed: {type(e).__name__}: {e}") from e


class _Source:
    """Where a checkpoint or tokenizer comes from; `fetch(patterns)` returns a local dir holding those files."""

    def __init__(self, what: str, name: str, revision: str | None):
        self.what, self.name, self.revision = what, name, revision
        self.local = Path(name).is_dir()
        self.commit: str | None = None
        if self.local:
            self.dir = Path(name)
            self.files = sorted(str(p.relative_to(self.dir)) for p in self.dir.rglob("*") if p.is_file())
            if revision:
                log.info("%s %s is a local directory; ignoring revision %r", what, name, revision)
            return
        if not HUB_ID.match(name):
            raise UserError(f"{what} {name!r}: no such local directory, and not a Hub id of the form owner/name")
        if not revision:
            raise UserError(f"{what} {name!r}: no such local directory; as a Hub id it needs a pinned revision "
                            "(a commit sha or tag)")
        from huggingface_hub import HfApi, constants

        if constants.HF_HUB_OFFLINE:  # offline nodes: the revision must be in the HF cache already
            snapshot = self.fetch(None)
            self.files = sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file())
        else:
            self.files = _hub_call(self, HfApi().list_repo_files, name, revision=revision,
                                   token=os.environ.get("HF_TOKEN") or None)

    def fetch(self, patterns: list[str] | None) -> Path:
        if self.local:
            return self.dir
        from huggingface_hub import snapshot_download

        # snapshot_download resumes interrupted downloads from the HF cache (HF_HOME).
        path = Path(_hub_call(self, snapshot_download, self.name,
                              revision=self.revision, allow_patterns=patterns,
                              token=os.environ.get("HF_TOKEN") or None))
        self.commit = path.name  # the cache names snapshot folders by commit sha
        return path


# ---------------------------------------------------------------------------------------------------
# Configs: mamba_ssm's dict <-> transformers' MambaConfig
# ---------------------------------------------------------------------------------------------------

def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    return vocab_size + (-vocab_size) % multiple


def _read_config(path: Path) -> tuple[str, dict, float]:
    """Return (format, mamba_ssm-style config dict, norm epsilon) for either format."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read config: {e}") from e
    if raw.get("model_type") == "mamba":
        return "transformers", _ssm_config_from_hf(raw, path), float(raw.get("layer_norm_epsilon", 1e-5))
    if "model_type" in raw:
        raise UserError(f"{path}: model_type {raw['model_type']!r} is not supported; expected 'mamba' "
                        "(transformers Mamba-1) or a mamba_ssm config with d_model, n_layer, ...")
    if not {"d_model", "n_layer"} <= raw.keys():
        raise UserError(f"{path}: neither a transformers Mamba config (model_type 'mamba') nor a mamba_ssm "
                        "config (d_model, n_layer, vocab_size, ssm_cfg, ...)")
    _check_ssm_config(raw, path)
    return "mamba_ssm", raw, 1e-5  # mamba_ssm's MixerModel always uses norm_epsilon 1e-5


def _check_ssm_config(cfg: dict, path: Path) -> None:
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


def _ssm_config_from_hf(raw: dict, path: Path) -> dict:
    if raw.get("hidden_act", "silu") != "silu":
        raise UserError(f"{path}: hidden_act {raw['hidden_act']!r}; Mamba uses silu")
    from transformers import MambaConfig

    hf = MambaConfig.from_dict(raw)
    return {
        "d_model": hf.hidden_size, "d_intermediate": 0, "n_layer": hf.num_hidden_layers,
        "vocab_size": hf.vocab_size,
        "ssm_cfg": {"layer": "Mamba1", "d_state": hf.state_size, "d_conv": hf.conv_kernel, "expand": hf.expand,
                    "dt_rank": int(hf.time_step_rank), "conv_bias": hf.use_conv_bias, "bias": hf.use_bias},
        "rms_norm": True, "residual_in_fp32": hf.residual_in_fp32, "fused_add_norm": True,
        "pad_vocab_size_multiple": 1, "tie_embeddings": hf.tie_word_embeddings,
    }


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


def expected_ssm_shapes(hf_config) -> dict[str, tuple[int, ...]]:
    """Tensor shapes a checkpoint must have, under mamba_ssm's key names (from a weightless model)."""
    from transformers import MambaForCausalLM

    with torch.device("meta"):
        model = MambaForCausalLM(hf_config)
    shapes = {_to_ssm_key(k): tuple(v.shape) for k, v in model.state_dict().items()}
    if hf_config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def _to_ssm_key(key: str) -> str:
    return key.replace("backbone.embeddings.", "backbone.embedding.")


def _to_hf_key(key: str) -> str:
    return key.replace("backbone.embedding.", "backbone.embeddings.")


# ---------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------

def _weight_patterns(files: list[str], fmt: str, where: str) -> list[str]:
    """Which weight files to fetch (safetensors preferred); UserError if there are none."""
    if fmt == "transformers" and "model.safetensors.index.json" in files:
        return ["model.safetensors.index.json", "model-*.safetensors"]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if name in files:
            return [name]
    raise UserError(f"{where}: no weights found (expected model.safetensors or pytorch_model.bin"
                    f"{' or a sharded model.safetensors.index.json' if fmt == 'transformers' else ''})")


def _load_weights(directory: Path, patterns: list[str]) -> tuple[dict[str, torch.Tensor], list[Path]]:
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


def _canonical_state_dict(sd: dict[str, torch.Tensor], shapes: dict, tied: bool, where: str) -> dict:
    """Source weights -> fp32, mamba_ssm key names; checked against the config's expected shapes."""
    sd = {_to_ssm_key(k): v for k, v in sd.items()}
    if tied and "lm_head.weight" in sd:
        lm_head = sd.pop("lm_head.weight")
        embedding = sd.get("backbone.embedding.weight")
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


def _write_model(out: Path, ssm_sd: dict, hf_config, stop_ids: tuple[int, ...] = ()) -> Path:
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    weights = out / "model.safetensors"
    save_file({_to_hf_key(k): v for k, v in ssm_sd.items()}, weights, metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    weights.chmod(0o666 & ~umask)  # safetensors writes 0600; others on a cluster must read the base model
    hf_config.save_pretrained(out)
    # generation stops at eos and at the chat template's end-of-turn token (ChatML's <|im_end|>), if any
    eos = [EOS_ID, *stop_ids] if stop_ids else EOS_ID
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=eos, pad_token_id=PAD_ID).save_pretrained(out)
    return weights


# ---------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------

def _prepare_tokenizer(src: _Source, chat_template: str | None, rows: int):
    """Load the tokenizer, check the GPT-NeoX special ids, set pad and the chat template."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    if not any(f in src.files for f in ("tokenizer.json", "tokenizer_config.json")):
        raise UserError(f"tokenizer {src.name}: no tokenizer.json or tokenizer_config.json")
    path = src.fetch(TOKENIZER_FILES)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"tokenizer {src.name}: cannot load: {e}") from e
    vocab = tok.get_vocab()
    for token, want in ((EOS_TOKEN, EOS_ID), (PAD_TOKEN, PAD_ID)):
        if vocab.get(token) != want:
            raise UserError(f"tokenizer {src.name}: {token} has id {vocab.get(token)}, expected {want} "
                            "(GPT-NeoX tokenizer layout)")
    tok.bos_token, tok.eos_token, tok.pad_token = EOS_TOKEN, EOS_TOKEN, PAD_TOKEN
    if len(tok) > rows:
        raise UserError(f"tokenizer {src.name} has {len(tok)} tokens but the model's embedding has only {rows} rows")
    added = []
    if chat_template == "chatml":
        added = [t for t in CHATML_TOKENS if t not in vocab]
        if len(tok) + len(added) > rows:
            raise UserError(f"chat template chatml needs new tokens {added}, but the embedding has only "
                            f"{rows - len(tok)} spare rows ({len(tok)} tokens, {rows} rows)")
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in added], special_tokens=True)
    if chat_template:
        tok.chat_template = CHAT_TEMPLATES[chat_template]
    return tok, added


# ---------------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------------

def verify_against_reference(model_dir: Path, ssm_sd: dict, ssm_config: dict, eps: float, prompt_ids: list[int],
                             new_tokens: int = VERIFY_NEW_TOKENS) -> dict:
    """Logits and greedy continuation of the written checkpoint (transformers, CPU, mambapy scan) vs
    the reference forward of the source weights."""
    from transformers import MambaForCausalLM

    from mamba_align.model import reference

    model, info = MambaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_mambapy=True,
                                                   output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    if bad:
        raise RuntimeError(f"{model_dir}: transformers loaded the converted checkpoint with problems: {bad}")
    model.eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        hf_logits = model(ids).logits
        # greedy through generate(): transformers' cached step path, the one scoring will use;
        # no eos so both sides produce exactly new_tokens
        hf_greedy = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                                   pad_token_id=PAD_ID)[0, ids.shape[1]:].tolist()
    ref_logits = reference.forward(ssm_sd, ssm_config, ids, eps=eps)
    ref_greedy = reference.greedy(ssm_sd, ssm_config, ids, new_tokens)[0].tolist()
    diff = (hf_logits - ref_logits).abs()
    return {
        "prompt_ids": prompt_ids,
        "max_abs_logit_diff": diff.max().item(),
        "mean_abs_logit_diff": diff.mean().item(),
        "max_abs_logit": ref_logits.abs().max().item(),
        "greedy_reference": ref_greedy,
        "greedy_converted": hf_greedy,
        "greedy_continuation_identical": ref_greedy == hf_greedy,
        "converted_runtime": "transformers MambaForCausalLM, CPU, use_mambapy=True",
        "reference_runtime": "mamba_align.model.reference (sequential fp32 scan)",
    }


# ---------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------

def prepare_base_model(source: str, revision: str | None, tokenizer: str | None, tokenizer_revision: str | None,
                       chat_template: str | None, out_dir: str | os.PathLike, report_path: str | os.PathLike,
                       verify: bool = True) -> dict:
    """Convert `source` (local dir or Hub id@revision, mamba_ssm or transformers format) into a transformers
    MambaForCausalLM directory at `out_dir` (written atomically) and write a JSON report to `report_path`.

    tokenizer=None skips the tokenizer (a weights-only check, e.g. on a GPU box); then chat_template must be None.
    """
    started = time.time()
    if chat_template is not None and chat_template not in CHAT_TEMPLATES:
        raise UserError(f"unknown chat template {chat_template!r}; expected one of {sorted(CHAT_TEMPLATES)}")
    if chat_template and not tokenizer:
        raise UserError(f"chat template {chat_template!r} needs a tokenizer")

    src = _Source("model", str(source), revision)
    if "config.json" not in src.files:
        raise UserError(f"model {source}: no config.json")
    fmt, ssm_config, eps = _read_config(src.fetch(["config.json"]) / "config.json")
    hf_config = hf_config_from_ssm(ssm_config, eps)
    rows = hf_config.vocab_size
    patterns = _weight_patterns(src.files, fmt, f"model {source}")
    log.info("model %s: %s format, d_model %d, %d layers, %d vocab rows", source, fmt, ssm_config["d_model"],
             ssm_config["n_layer"], rows)

    tok_src = tok = None
    added: list[str] = []
    if tokenizer:
        tok_src = _Source("tokenizer", str(tokenizer), tokenizer_revision)
        tok, added = _prepare_tokenizer(tok_src, chat_template, rows)

    src_dir = src.fetch(["config.json", *patterns])
    raw_sd, src_files = _load_weights(src_dir, patterns)
    source_dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in raw_sd.values()})
    ssm_sd = _canonical_state_dict(raw_sd, expected_ssm_shapes(hf_config), hf_config.tie_word_embeddings,
                                   f"model {source}")
    del raw_sd

    with atomic_path(out_dir) as tmp:
        stop_ids = (tok.convert_tokens_to_ids("<|im_end|>"),) if chat_template == "chatml" else ()
        weights = _write_model(tmp, ssm_sd, hf_config, stop_ids)
        if tok is not None:
            tok.save_pretrained(tmp)
        checks = None
        if verify:
            prompt = (tok(VERIFY_PROMPT)["input_ids"] if tok is not None
                      else [(7 * i + 2) % rows for i in range(VERIFY_PROMPT_TOKENS)])[:VERIFY_PROMPT_TOKENS]
            checks = verify_against_reference(tmp, ssm_sd, ssm_config, eps, prompt)
            log.info("verify: max |dlogit| %.3g, greedy identical %s", checks["max_abs_logit_diff"],
                     checks["greedy_continuation_identical"])
            if checks["max_abs_logit_diff"] > VERIFY_ATOL or not checks["greedy_continuation_identical"]:
                raise UserError(f"model {source}: converted checkpoint disagrees with the reference forward: "
                                f"max |dlogit| {checks['max_abs_logit_diff']:.3g} (allowed {VERIFY_ATOL}), greedy "
                                f"{checks['greedy_converted']} vs {checks['greedy_reference']}")
        weights_sha256 = {weights.name: sha256_file(weights)}

    import transformers

    report = {
        "source": str(source), "revision": revision, "resolved_commit": src.commit, "format": fmt,
        "source_weights": {p.name: sha256_file(p) for p in src_files}, "source_dtypes": source_dtypes,
        "out_dir": str(out_dir), "weights_sha256": weights_sha256, "dtype": "float32",
        "n_params": sum(v.numel() for v in ssm_sd.values()),
        "vocab_rows": rows, "source_vocab_size": ssm_config["vocab_size"],
        "tied_embeddings": hf_config.tie_word_embeddings,
        "config": {k: getattr(hf_config, k) for k in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                                       "state_size", "time_step_rank", "conv_kernel",
                                                       "bos_token_id", "eos_token_id", "pad_token_id")},
        "tokenizer": str(tokenizer) if tokenizer else None, "tokenizer_revision": tokenizer_revision,
        "tokenizer_resolved_commit": tok_src.commit if tok_src else None,
        "tokenizer_size": len(tok) if tok is not None else None,
        "chat_template": chat_template, "added_tokens": added,
        "verify": checks, "verified": bool(verify),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "seconds": round(time.time() - started, 1),
    }
    write_json(report_path, report)
    log.info("wrote %s (%d parameters) and %s", out_dir, report["n_params"], report_path)
    return report


# ---------------------------------------------------------------------------------------------------
# Command lines
# ---------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Convert a Mamba checkpoint to a transformers MambaForCausalLM dir.")
    p.add_argument("--source", required=True, help="local directory or Hub id (owner/name)")
    p.add_argument("--revision", help="Hub commit sha or tag (required for a Hub source)")
    p.add_argument("--tokenizer", help="local directory or Hub id; omit to skip the tokenizer")
    p.add_argument("--tokenizer-revision")
    p.add_argument("--chat-template", choices=sorted(CHAT_TEMPLATES))
    p.add_argument("--out-dir", required=True)
    p.add_argument("--report", required=True, help="JSON report path")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the CPU check against model/reference.py (slow for 2.8B)")
    p.add_argument("--log", help="log file")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.log)
    prepare_base_model(args.source, args.revision, args.tokenizer, args.tokenizer_revision, args.chat_template,
                       args.out_dir, args.report, verify=args.verify)


if __name__ == "__main__":
    main()

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

The pieces: model/source.py finds the files, model/mapping.py maps config and weights between the two
formats, model/tokenizer.py prepares the tokenizer and chat template.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from mamba_align.model.manifest import write_manifest
from mamba_align.model.mapping import (
    canonical_ssm_state_dict,
    expected_ssm_shapes,
    hf_config_from_ssm,
    load_weights,
    mamba_ssm_to_hf_state_dict,
    read_config,
    weight_patterns,
)
from mamba_align.model.source import Source
from mamba_align.model.tokenizer import (
    BOS_ID,
    CHAT_TEMPLATES,
    EOS_ID,
    PAD_ID,
    prepare_tokenizer,
)
from mamba_align.utils import (
    UserError,
    atomic_path,
    follow_umask,
    sha256_file,
    write_json,
)

log = logging.getLogger(__name__)

VERIFY_PROMPT = "The quick brown fox jumps over the lazy dog. A state space model reads one token at a time"
VERIFY_PROMPT_TOKENS = 16
VERIFY_NEW_TOKENS = 8
VERIFY_ATOL = 1e-3  # fp32 logits; measured: ~1e-6 on tiny CPU models, 3e-5 at 2.8B shape on an H100


# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------

def _write_model(out: Path, ssm_sd: dict, hf_config, stop_ids: tuple[int, ...] = ()) -> Path:
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    weights = out / "model.safetensors"
    save_file(mamba_ssm_to_hf_state_dict(ssm_sd, hf_config.tie_word_embeddings), weights, metadata={"format": "pt"})
    follow_umask(weights)  # safetensors writes 0600; others on a cluster must read the base model
    hf_config.save_pretrained(out)
    # generation stops at eos and at the chat template's end-of-turn token (ChatML's <|im_end|>), if any
    eos = [EOS_ID, *stop_ids] if stop_ids else EOS_ID
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=eos, pad_token_id=PAD_ID).save_pretrained(out)
    return weights


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
                       verify: bool = True, rule: str = "prepare_base_model") -> dict:
    """Convert `source` (local dir or Hub id@revision, mamba_ssm or transformers format) into a transformers
    MambaForCausalLM directory at `out_dir` (written atomically) and write a JSON report to `report_path`.

    tokenizer=None skips the tokenizer (a weights-only check, e.g. on a GPU box); then chat_template must be None.
    The directory's manifest.json (mamba_align.model.manifest) records its files and `rule`, the rule that rebuilds it.
    """
    started = time.time()
    if chat_template is not None and chat_template not in CHAT_TEMPLATES:
        raise UserError(f"unknown chat template {chat_template!r}; expected one of {sorted(CHAT_TEMPLATES)}")
    if chat_template and not tokenizer:
        raise UserError(f"chat template {chat_template!r} needs a tokenizer")

    src = Source("model", str(source), revision)
    if "config.json" not in src.files:
        raise UserError(f"model {source}: no config.json")
    fmt, ssm_config, eps = read_config(src.fetch(["config.json"]) / "config.json")
    hf_config = hf_config_from_ssm(ssm_config, eps)
    rows = hf_config.vocab_size
    patterns = weight_patterns(src.files, fmt, f"model {source}")
    log.info("model %s: %s format, d_model %d, %d layers, %d vocab rows", source, fmt, ssm_config["d_model"],
             ssm_config["n_layer"], rows)

    tok_src = tok = None
    added: list[str] = []
    if tokenizer:
        tok_src = Source("tokenizer", str(tokenizer), tokenizer_revision)
        tok, added = prepare_tokenizer(tok_src, chat_template, rows)

    src_dir = src.fetch(["config.json", *patterns])
    raw_sd, src_files = load_weights(src_dir, patterns)
    source_dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in raw_sd.values()})
    ssm_sd = canonical_ssm_state_dict(raw_sd, expected_ssm_shapes(hf_config), hf_config.tie_word_embeddings,
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
        files = write_manifest(tmp, rule)  # what every consumer checks the model against
        weights_sha256 = {weights.name: files[weights.name]["sha256"]}

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

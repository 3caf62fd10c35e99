"""A published model's manifest: every file's size and sha256, and the rule that writes the model.

`manifest.json` sits in the model directory (the base model, each stored SFT/DPO model). A step that consumes a
model checks it first (sizes: a stat each; then hashes, one read of every byte, the same pass that gives the
model's identity for a training key), so a truncated or altered file fails naming the file and the rule that
rebuilds it, before any checkpoint folder, engine or GPU is touched. A model written before manifests existed
is read with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from mamba_align.utils import UserError, file_record, write_json

log = logging.getLogger("mamba_align.model.manifest")

MANIFEST = "manifest.json"
RUN_FILE = "run.json"  # a stored model's key and what it learned from (mamba_align.ops.store.runs)
NOT_MODEL_FILES = (RUN_FILE, MANIFEST)  # records about a model, not part of it (nor of its identity)


def model_files(model_dir) -> list[Path]:
    """The model's files in a fixed order (hidden files, such as Snakemake's timestamp, and our records left out)."""
    root = Path(model_dir).resolve()
    out = []
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root)
        if f.is_file() and not any(p.startswith(".") for p in rel.parts) and rel.name not in NOT_MODEL_FILES:
            out.append(f)
    return out


def file_hashes(model_dir) -> dict[str, dict]:
    """{relative path: {size, sha256}} of every model file, in model_files' order. Reads every byte."""
    root = Path(model_dir).resolve()
    return {str(f.relative_to(root)): file_record(f) for f in model_files(root)}


def identity_of(hashes: dict[str, dict]) -> str:
    """The model's identity (names and contents) from its file hashes."""
    h = hashlib.sha256()
    for rel, entry in hashes.items():
        h.update(f"{rel}:{entry['sha256']}\n".encode())
    return h.hexdigest()


def model_identity(model_dir, check: bool = True) -> str:
    """The one identity of a model: a sha256 of its files' names and contents (model_files: hidden files and our
    records left out, so a manifest, a run.json or Snakemake's timestamp never change it). It is the parent model in
    a training key (ops/store/runs), and keys a generation's progress (eval/generate) and the leaderboard's work folder,
    so a changed model never resumes an earlier one's answers. `check`: verify the model against its manifest in the
    same read (the identity is that read's by-product). Reads every byte: ~10 s for a 2.8B model."""
    return identity_of(verify_model(model_dir) if check else file_hashes(model_dir))


def write_manifest(model_dir, rule: str, hashes: dict[str, dict] | None = None) -> dict[str, dict]:
    """Record the model's files (hashing them unless `hashes` is given) and the rule that rebuilds it."""
    hashes = file_hashes(model_dir) if hashes is None else hashes
    write_json(Path(model_dir) / MANIFEST, {"rule": rule, "files": hashes})
    return hashes


def read_manifest(model_dir) -> dict | None:
    path = Path(model_dir) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable manifest ({e}); rebuild the model") from None


def verify_model(model_dir) -> dict[str, dict]:
    """Check a model against its manifest (sizes first, then contents) and return its file hashes (for its
    identity). A missing, resized or altered file is an error naming it and the rule that rebuilds the model."""
    shown = Path(model_dir)
    root = shown.resolve()
    if not root.is_dir():
        raise UserError(f"model {shown}: no such directory")
    manifest = read_manifest(root)
    if manifest is None:
        log.warning("model %s has no %s (written before manifests); its files are not checked", shown, MANIFEST)
        return file_hashes(root)
    expected, rule = manifest["files"], manifest.get("rule", "the rule that wrote it")

    def damaged(rel: str, why: str) -> UserError:
        return UserError(f"model {shown}: {root / rel} {why} (checked against {root / MANIFEST}); the model is "
                         f"damaged: rebuild it with `snakemake --forcerun {rule}`")

    for rel, entry in expected.items():  # cheap: a stat per file
        f = root / rel
        if not f.is_file():
            raise damaged(rel, "is missing")
        size = f.stat().st_size
        if size != entry["size"]:
            raise damaged(rel, f"is {size} bytes, expected {entry['size']}" + (" (truncated)" if size < entry["size"]
                                                                               else ""))
    hashes = file_hashes(root)
    for rel, entry in expected.items():
        if hashes[rel]["sha256"] != entry["sha256"]:
            raise damaged(rel, f"has sha256 {hashes[rel]['sha256'][:12]}…, expected {entry['sha256'][:12]}…")
    extra = sorted(set(hashes) - set(expected))
    if extra:
        log.warning("model %s: files not in its manifest (ignored by the check): %s", shown, ", ".join(extra))
    log.info("model %s: %d files match %s", shown, len(expected), MANIFEST)
    return hashes

"""One training job of the workflow: which checkpoint folder and model directory it uses, and what it leaves.

- Its key is a hash of everything the stage learns from: the recipe's learning settings (not the operational
  keys), the contents of its data files and the contents of its parent model. Checkpoints go to
  `<checkpoints>/<stage>-<key>/`, the model to `results/models/<stage>-<key>/`, and `results/models/<stage>`
  (the rule's declared output) is a symlink to it: a mistaken `--forcerun` or a failed retrain deletes only
  that symlink, never a finished model.
- Training always trains: it resumes only an unfinished run of the same key (a pre-empted or killed job).
  A finished run's checkpoints are deleted once its model is stored, so a retrain starts from scratch.
- Retraining a key whose model exists first moves that model to `<stage>-<key>.previous` (one previous
  version is kept; an older one is deleted).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from mamba_align.ops import layout
from mamba_align.train.recipes import OPERATIONAL_KEYS, as_dict
from mamba_align.utils import read_json, write_json

log = logging.getLogger("mamba_align.ops.runs")

RUN_FILE = "run.json"  # in a stored model: its key and what it learned from
PREVIOUS = ".previous"


def file_digest(path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def model_identity(model_dir) -> str:
    """A hash of a model directory's files (names and contents; hidden files such as Snakemake's timestamp and
    our run.json excluded). Reads every byte: ~10 s for a 2.8B model, once per training job."""
    root = Path(model_dir).resolve()
    h = hashlib.sha256()
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root)
        if f.is_file() and not any(p.startswith(".") for p in rel.parts) and rel.name != RUN_FILE:
            h.update(f"{rel}:{file_digest(f)}\n".encode())
    return h.hexdigest()


def learned_from(stage: str, recipe, data_files, parent_model) -> dict:
    settings = {k: v for k, v in as_dict(recipe).items() if k not in OPERATIONAL_KEYS}
    return {"stage": stage, "recipe": json.loads(json.dumps(settings, default=str)),
            "data": [file_digest(f) if f is not None else None for f in data_files],  # by role: train, test
            "parent_model": model_identity(parent_model)}


def run_key(stage: str, recipe, data_files, parent_model) -> str:
    """The key of a training run: settings, data identity and parent model identity, hashed."""
    return _key(learned_from(stage, recipe, data_files, parent_model))


def _key(what: dict) -> str:
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]


def _point(link: Path, target: Path) -> None:
    """Make `link` a relative symlink to `target`, atomically; a real directory there is kept as .previous."""
    if link.exists() and not link.is_symlink():
        _keep_as_previous(link)
    tmp = link.with_name(f".{link.name}.link-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target, link.parent), tmp)
    os.replace(tmp, link)


def _keep_as_previous(model: Path) -> Path:
    previous = model.with_name(model.name + PREVIOUS)
    if previous.exists() or previous.is_symlink():
        shutil.rmtree(previous) if previous.is_dir() and not previous.is_symlink() else previous.unlink()
    os.replace(model, previous)
    log.warning("retraining: the earlier model %s is kept as %s", model, previous)
    return previous


def train_stage(stage: str, model, train, test, recipe, out, checkpoints, metrics, num_processes: int = 1,
                fsdp: bool = False) -> dict:
    """Train `stage` (sft or dpo; DPO uses its input model as the reference) into the keyed model directory,
    point `out` at it and delete the run's checkpoints. Returns the metrics."""
    from mamba_align.train.checkpoints import last_complete_checkpoint, lock_checkpoint_dir, release_checkpoint_dir
    from mamba_align.train.launch import train_dpo, train_sft

    what = learned_from(stage, recipe, [train, test], model)
    key = _key(what)
    ckpt = Path(layout.checkpoint_dir(str(checkpoints), stage, key))
    # live curves (recipe key report_to): `tensorboard --logdir results/logs/tensorboard`, one folder per run
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", layout.tensorboard_dir(str(Path(checkpoints).parent), str(ckpt)))
    out = Path(out)
    store = Path(layout.stored_model_dir(str(out), key))
    lock_checkpoint_dir(ckpt)  # before the model store is touched: a second job on this key stops here
    try:
        resume = last_complete_checkpoint(ckpt)
        log.info("%s run %s: checkpoints in %s (%s), model to %s", stage, key, ckpt,
                 f"resuming {resume.name}" if resume else "from scratch", store)
        if store.exists() and resume is None:
            _keep_as_previous(store)
        if stage == "sft":
            train_sft(model, train, test, recipe, store, ckpt, metrics, num_processes=num_processes, fsdp=fsdp)
        else:
            train_dpo(model, model, train, test, recipe, store, ckpt, metrics, num_processes=num_processes,
                      fsdp=fsdp)
        write_json(store / RUN_FILE, {"key": key, "parent_model_path": str(Path(model).resolve()), **what})
        _point(out, store)
        metrics_file = read_json(metrics)
        metrics_file["run"] = {"key": key, "model": str(store), "checkpoints_removed": str(ckpt)}
        write_json(metrics, metrics_file)
        shutil.rmtree(ckpt)  # the model is stored: its checkpoints (tens of GB at 2.8B) go
        log.info("%s run %s finished: %s -> %s; removed %s", stage, key, out, store.name, ckpt)
        return metrics_file
    finally:
        release_checkpoint_dir(ckpt)

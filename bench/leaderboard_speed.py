"""Leaderboard-style multiple-choice scoring speed: lm-eval's stock `hf` model, lm-eval's `mamba_ssm` model
and ours (`mamba_align`, eval/leaderboard/lm.py: each shared context read once) on the same tasks.

Random weights at the 2.8B shape (state-spaces/mamba-2.8b-slimpj: d_model 2560, 64 layers, vocab 50280
padded to 50288) in bf16, written once as a transformers checkpoint (hf, ours) and as a mamba_ssm checkpoint
(lm-eval's mamba_ssm path) through model/mapping.py. The tasks are synthetic local lm-eval YAML tasks shaped
like the suite (contexts, choices and continuation lengths in tokens; the BPE tokenizer is trained here on
the synthetic words, about one token per word):

    arc_c      25-shot, 4 choices of 1-8 words               (~1000-token contexts)
    hellaswag  10-shot, 4 endings of 20-40 words             (~800-token contexts, ~30-token endings)
    mmlu        5-shot, 4 one-token choices " A".." D"       (~650-token contexts; the same 5 examples before
                                                             every question: lm-eval's `first_n` sampler, as MMLU)
    truthfulqa  0-shot, 4-12 choices of 5-20 words (mc2)     (~150-token contexts)

Per path and task: requests, request tokens (context + continuation of every request: the same work for
every path), the positions the model ran (padding and re-read contexts included), seconds inside
`loglikelihood` (model_s) and of the whole simple_evaluate call (wall_s), request tokens per model second,
the task's accuracy, and the largest absolute difference of per-sample log-likelihoods from the stock `hf`
path. A path that fails is recorded with its error; the others still run. The JSON is rewritten after every
task (--out, else $OUT/leaderboard_speed.json).

    PYTHONPATH=src python bench/leaderboard_speed.py --limit 100          # one H200, 2.8B
    PYTHONPATH=src python bench/leaderboard_speed.py --tiny               # CPU smoke test, end to end
    # or in two commands (each under 10 minutes), the second reusing the first's models and hf reference:
    PYTHONPATH=src python bench/leaderboard_speed.py --workdir /tmp/lb --paths hf,ours --out $OUT/a.json
    PYTHONPATH=src python bench/leaderboard_speed.py --workdir /tmp/lb --reuse --paths mamba_ssm --out $OUT/b.json

Offline: nothing is fetched from the Hub (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from _benchutil import cuda_sync, emit, environment, random_model  # noqa: E402

TASKS = {
    # name: (num_fewshot, doc_to_text, doc_to_choice)
    "arc_c": (25, "Question: {{question}}\\nAnswer:", "{{choices}}"),
    "hellaswag": (10, "{{ctx}}", "{{choices}}"),
    "mmlu": (5, "{{question}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}\\nD. {{choices[3]}}"
             "\\nAnswer:", "{{['A', 'B', 'C', 'D']}}"),
    "truthfulqa": (0, "{{preamble}}\\n\\nQ: {{question}}\\nA:", "{{choices}}"),
}


def lexicon(rng: random.Random, n: int = 3000) -> list[str]:
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"]
    return sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(n)})


def make_docs(task: str, n: int, rng: random.Random, words: list[str], preamble: str) -> list[dict]:
    def text(lo, hi):
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    docs = []
    for _ in range(n):
        if task == "arc_c":
            doc = {"question": text(18, 40) + "?", "choices": [text(1, 8) for _ in range(4)]}
        elif task == "hellaswag":
            doc = {"ctx": text(35, 65), "choices": [text(20, 40) + "." for _ in range(4)]}
        elif task == "mmlu":
            doc = {"question": text(20, 80) + "?", "choices": [text(3, 20) for _ in range(4)]}
        else:
            doc = {"preamble": preamble, "question": text(8, 20) + "?",
                   "choices": [text(5, 20) + "." for _ in range(rng.randint(4, 12))]}
        doc["answer"] = rng.randrange(len(doc["choices"]))
        docs.append(doc)
    return docs


def write_tasks(root: Path, limit: int | dict[str, int], seed: int) -> list[str]:
    """jsonl data and one lm-eval YAML per task under root/tasks (`limit` test documents, or per task);
    returns the corpus (for the tokenizer)."""
    rng = random.Random(seed)
    words = lexicon(rng)
    preamble = "\n\n".join(f"Q: {' '.join(rng.choices(words, k=10))}?\nA: {' '.join(rng.choices(words, k=6))}."
                           for _ in range(6))
    # the prompts' fixed words, so that " A".." D" are single tokens as in GPT-NeoX's vocabulary
    corpus = [preamble] + ["Question: Answer: Q: A:" + "".join(f"\n{c}. x Answer: {c}" for c in "ABCD")] * 200
    tasks = root / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    for name, (shots, doc_to_text, doc_to_choice) in TASKS.items():
        n = limit[name] if isinstance(limit, dict) else limit
        splits = {"train": make_docs(name, 60, rng, words, preamble),
                  "test": make_docs(name, n, rng, words, preamble)}
        files = {}
        for split, docs in splits.items():
            files[split] = tasks / f"{name}_{split}.jsonl"
            files[split].write_text("".join(json.dumps(d) + "\n" for d in docs))
            corpus += [json.dumps(d) for d in docs]
        (tasks / f"{name}.yaml").write_text(
            f"task: synth_{name}\ndataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    train: {files['train']}\n    test: {files['test']}\n"
            f"training_split: train\nfewshot_split: train\ntest_split: test\nnum_fewshot: {shots}\n"
            # MMLU's few-shot examples are the first of its dev split (lm-eval's mmlu template): one prefix
            + ("fewshot_config:\n  sampler: first_n\n" if name == "mmlu" else "") +
            f"output_type: multiple_choice\ndoc_to_text: \"{doc_to_text}\"\ndoc_to_choice: \"{doc_to_choice}\"\n"
            "doc_to_target: answer\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return corpus


def write_models(root: Path, shape: str, device: str, dtype: str, corpus: list[str],
                 mamba_ssm: bool = True) -> tuple[Path, Path]:
    """The same random weights as a transformers checkpoint (+ tokenizer) and a mamba_ssm checkpoint."""
    import torch
    from transformers import AutoTokenizer

    from mamba_align.model.mapping import hf_to_mamba_ssm_state_dict, mamba_ssm_config_from_hf
    from mamba_align.model.tokenizer import CHAT_TEMPLATES, PAD_TOKEN
    from mamba_align.testing.demo import build_tiny_tokenizer

    rows = 50288 if shape == "2.8b" else 8192
    tok_dir = build_tiny_tokenizer(root / "tokenizer", corpus, vocab_size=min(8000, rows))
    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.pad_token = PAD_TOKEN
    tok.chat_template = CHAT_TEMPLATES["zephyr"]
    model = random_model(shape, device, getattr(torch, dtype), vocab_size=rows, pad_token_id=1)
    hf_dir, ssm_dir = root / "model_hf", root / "model_mamba_ssm"
    model.save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)
    if mamba_ssm:
        cfg = mamba_ssm_config_from_hf(model.config)
        ssm_dir.mkdir(exist_ok=True)
        sd = hf_to_mamba_ssm_state_dict(model.state_dict(), cfg["tie_embeddings"])
        torch.save({k: v.detach().cpu().contiguous() for k, v in sd.items()}, ssm_dir / "pytorch_model.bin")
        (ssm_dir / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
        del sd
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the paths run in processes of their own
    return hf_dir, ssm_dir


def load_path(path: str, hf_dir: Path, ssm_dir: Path, device: str, a):
    if path == "hf":
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=str(hf_dir), device=device, batch_size=a.batch_size, dtype=a.dtype)
        return lm, lm.model.backbone.embeddings
    if path == "mamba_ssm":
        from lm_eval.models.mamba_lm import MambaLMWrapper

        lm = MambaLMWrapper(pretrained=str(ssm_dir), tokenizer=str(hf_dir), device=device,
                            batch_size=a.batch_size, dtype=a.dtype, max_length=2048)
        return lm, lm.model.backbone.embedding
    if path != "ours":
        raise ValueError(f"unknown path {path!r} (expected hf, mamba_ssm or ours)")
    from mamba_align.eval.leaderboard.lm import MambaAlignLM

    lm = MambaAlignLM(str(hf_dir), device=device, batch_size=a.rows, dtype=a.dtype,
                      prefill_tokens=a.prefill_tokens)
    return lm, None


class Meter:
    """Times `loglikelihood` and counts request tokens and the positions the model ran."""

    def __init__(self, lm, embedding):
        self.lm, self.model_s, self.requests, self.request_tokens, self.positions = lm, 0.0, 0, 0, 0
        if embedding is not None:  # a hook on the embedding; ours counts itself (CUDA-graph replays skip hooks)
            embedding.register_forward_hook(self._hook)
        self.inner = lm.loglikelihood
        lm.loglikelihood = self.loglikelihood

    def _hook(self, module, args, out):
        self.positions += args[0].numel()

    def loglikelihood(self, requests, *args, **kwargs):
        stats = getattr(getattr(self.lm, "scorer", None), "stats", None)
        before = stats["positions"] if stats is not None else 0
        cuda_sync()
        t0 = time.perf_counter()
        out = self.inner(requests, *args, **kwargs)
        cuda_sync()
        self.model_s += time.perf_counter() - t0
        if stats is not None:
            self.positions += stats["positions"] - before
        self.requests += len(requests)
        for req in requests:
            ctx, cont = req.args
            ctx_enc, cont_enc = self.lm._encode_pair(ctx, cont) if ctx else ([0], self.lm.tok_encode(cont))
            self.request_tokens += len(ctx_enc) + len(cont_enc)
        return out


def run_path(path, hf_dir, ssm_dir, device, a, tasks_dir, part: Path) -> None:
    """Every task on one path (in a process of its own); `part` (JSON: one row and the per-sample
    log-likelihoods per task, or the error) is rewritten as each task ends."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.api.instance import Instance
    from lm_eval.tasks import TaskManager

    entry: dict = {"tasks": {}, "lls": {}}

    def save():
        tmp = part.with_name(part.name + ".tmp")
        tmp.write_text(json.dumps(entry, default=str) + "\n")
        tmp.replace(part)

    try:
        t0 = time.perf_counter()
        lm, embedding = load_path(path, hf_dir, ssm_dir, device, a)
        entry["load_s"] = round(time.perf_counter() - t0, 2)
        warm = [Instance("loglikelihood", {}, ("the " * 50, " a b"), i) for i in range(8)]
        lm.loglikelihood(warm)  # CUDA init, autotuning, graph capture: outside the timings
        meter = Meter(lm, embedding)
        tm = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    except Exception as e:  # noqa: BLE001 - recorded; the other paths run in their own processes
        entry["error"] = f"{type(e).__name__}: {e}"
        entry["traceback"] = traceback.format_exc()[-3000:]
        print(f"[{path}] failed to load: {entry['error']}", flush=True)
        save()
        return
    for task in TASKS:
        name = f"synth_{task}"
        meter.model_s = 0.0
        meter.requests = meter.request_tokens = meter.positions = 0
        try:
            t0 = time.perf_counter()
            out = simple_evaluate(model=lm, tasks=[name], task_manager=tm, limit=a.limit, log_samples=True,
                                  bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                  fewshot_random_seed=0)
            wall = time.perf_counter() - t0
            entry["lls"][task] = {str(s["doc_id"]): [float(r[0][0]) for r in s["resps"]]
                                  for s in out["samples"][name]}
            row = {"requests": meter.requests, "request_tokens": meter.request_tokens,
                   "positions": meter.positions, "model_s": round(meter.model_s, 3), "wall_s": round(wall, 3),
                   "tokens_per_s": round(meter.request_tokens / max(meter.model_s, 1e-9), 1),
                   "acc": out["results"][name].get("acc,none"),
                   "tokens_per_request": round(meter.request_tokens / max(meter.requests, 1), 1)}
            entry["tasks"][task] = row
            print(f"[{path}] {task}: {row}", flush=True)
        except Exception as e:  # noqa: BLE001
            entry["tasks"][task] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            print(f"[{path}] {task} failed: {entry['tasks'][task]['error']}", flush=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        save()


def spawn_path(path: str, root: Path, argv: list[str], timeout_s: float) -> tuple[dict, dict]:
    """Run one path in a child process (a CUDA fault there cannot take the other paths' numbers with it);
    its output is echoed. Returns (entry, per-sample log-likelihoods)."""
    import collections
    import subprocess

    part = root / f"part_{path}.json"
    part.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--workdir", str(root), "--child", path]
    tail: collections.deque = collections.deque(maxlen=60)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    try:
        for line in proc.stdout:
            print(line, end="", flush=True)
            tail.append(line)
            if time.perf_counter() - t0 > timeout_s:
                proc.kill()
                tail.append(f"killed after {timeout_s:.0f} s (--path-timeout, checked as output arrives)\n")
                break
    finally:
        rc = proc.wait()
    entry = json.loads(part.read_text()) if part.exists() else {"tasks": {}, "lls": {}}
    lls = entry.pop("lls", {})
    if rc != 0:
        entry["exit_code"] = rc
        entry["output_tail"] = "".join(tail)[-3000:]
        entry.setdefault("error", f"the process exited with code {rc} (output_tail)")
    return entry, lls


def table(result: dict) -> str:
    lines = [f"{'path':10} {'task':11} {'requests':>8} {'req_tokens':>10} {'positions':>10} {'model_s':>8} "
             f"{'wall_s':>8} {'tok/s':>10} {'max|dLL|':>9}"]
    for path, entry in result["paths"].items():
        if "error" in entry and not entry.get("tasks"):
            lines.append(f"{path:10} failed: {entry['error']}")
            continue
        for task in TASKS:
            r = entry["tasks"].get(task, {"error": entry.get("error", "not run")})
            if "error" in r:
                lines.append(f"{path:10} {task:11} failed: {r['error']}")
                continue
            diff = r.get("max_abs_diff_vs_hf")
            lines.append(f"{path:10} {task:11} {r['requests']:8d} {r['request_tokens']:10d} {r['positions']:10d} "
                         f"{r['model_s']:8.2f} {r['wall_s']:8.2f} {r['tokens_per_s']:10.0f} "
                         f"{'-' if diff is None else f'{diff:.4f}':>9}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny model on whatever device there is (smoke test)")
    p.add_argument("--limit", type=int, default=100, help="documents per task")
    p.add_argument("--paths", default="hf,mamba_ssm,ours", help="which paths, in order (hf first: the reference)")
    p.add_argument("--batch-size", type=int, default=32, help="lm-eval's batch size for hf and mamba_ssm")
    p.add_argument("--rows", type=int, default=64, help="ours: choices scored together (decode slots)")
    p.add_argument("--prefill-tokens", type=int, default=32768, help="ours: padded positions per prefill batch")
    p.add_argument("--workdir", default=None, help="where models and tasks are written (default: a temp dir)")
    p.add_argument("--out", default=None, help="the JSON (default $OUT/leaderboard_speed.json)")
    p.add_argument("--reuse", action="store_true", help="reuse --workdir's models and tasks (and its hf "
                   "log-likelihoods as the reference) when written for the same shape and --limit")
    p.add_argument("--path-timeout", type=float, default=1800, help="seconds before a path's process is killed")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one path
    a = p.parse_args(argv)
    unknown = set(a.paths.split(",")) - {"hf", "mamba_ssm", "ours"}
    if unknown:
        p.error(f"--paths: unknown {sorted(unknown)} (expected hf, mamba_ssm, ours)")

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = "tiny" if a.tiny else "2.8b"
    a.dtype = "bfloat16" if device == "cuda" else "float32"  # transformers' CPU scan (mambapy) needs float32
    if a.tiny:
        a.limit, a.batch_size, a.rows = min(a.limit, 2), 8, 16
    root = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="leaderboard_speed_"))
    root.mkdir(parents=True, exist_ok=True)
    result = {"bench": "leaderboard_speed", "shape": shape, "dtype": a.dtype, "limit": a.limit,
              "batch_size": a.batch_size, "rows": a.rows, "prefill_tokens": a.prefill_tokens,
              "env": environment(), "paths": {}}
    out_path = Path(a.out) if a.out else (Path(os.environ["OUT"]) / "leaderboard_speed.json"
                                          if os.environ.get("OUT") else None)

    def save():
        if out_path is not None:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = out_path.with_name(out_path.name + ".tmp")
            tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
            tmp.replace(out_path)

    if a.child:  # one path, in the process the parent started for it
        run_path(a.child, root / "model_hf", root / "model_mamba_ssm", device, a, root / "tasks",
                 root / f"part_{a.child}.json")
        return {}
    t0 = time.perf_counter()
    setup = root / "setup.json"
    wanted = {"shape": shape, "dtype": a.dtype, "limit": a.limit}
    if a.reuse and setup.exists() and json.loads(setup.read_text()) == wanted:
        result["setup"] = f"reused {root}"
    else:
        setup.unlink(missing_ok=True)
        corpus = write_tasks(root, a.limit, seed=0)
        write_models(root, shape, device, a.dtype, corpus)
        setup.write_text(json.dumps(wanted) + "\n")
        result["setup_s"] = round(time.perf_counter() - t0, 1)
    save()
    argv = list(sys.argv[1:] if argv is None else argv)
    lls: dict = {}
    if "hf" not in a.paths.split(",") and a.reuse and (root / "part_hf.json").exists():
        lls["hf"] = json.loads((root / "part_hf.json").read_text()).get("lls", {})  # an earlier run's reference
    for path in [p.strip() for p in a.paths.split(",")]:
        result["paths"][path], lls[path] = spawn_path(path, root, argv, a.path_timeout)
        for task, row in result["paths"][path]["tasks"].items():
            ref, got = lls.get("hf", {}).get(task), lls[path].get(task)
            if path != "hf" and ref and got and "error" not in row:
                row["max_abs_diff_vs_hf"] = max(abs(x - y) for d in got for x, y in zip(got[d], ref[d], strict=True))
        save()
    result["table"] = table(result)
    print(result["table"], flush=True)
    save()
    if out_path is None:
        emit("leaderboard_speed", result)
    return result


if __name__ == "__main__":
    main()

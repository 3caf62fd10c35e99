"""Generate MT-Bench answers and AlpacaEval outputs with the model's own chat template.

Both steps are resumable: finished items are appended (fsynced) to a progress JSONL beside the output,
and the declared output is written atomically once every item is done.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import time
import uuid
from pathlib import Path

from mamba_align.eval.engine import load_engine
from mamba_align.eval.engine.sampling import Sampling
from mamba_align.model.manifest import model_identity
from mamba_align.train.data import with_system_turn
from mamba_align.utils import (
    ProgressLog,
    UserError,
    append_jsonl,
    progress_file,
    progress_files,
    read_jsonl,
    write_json,
    write_jsonl,
)

log = logging.getLogger(__name__)

# FastChat's gen_model_answer calls transformers' generate without top_k: its default of 50 applies.
FASTCHAT_TOP_K = 50
# Prompts handed to the engine per call, and the unit of resumption. Larger than the engine's batch so
# that a slot freed by a short answer is refilled at once (the GPU engine decodes continuously).
CHUNK = 256

# FastChat's llm_judge temperature per MT-Bench category (gen_model_answer.py / common.py)
MT_BENCH_TEMPERATURE = {
    "writing": 0.7, "roleplay": 0.7,
    "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0,
    "stem": 0.1, "humanities": 0.1,
    "arena-hard-200": 0.0,
}


def progress_path(out_path: str | Path, model_dir: str | Path, *settings) -> Path:
    """The progress file of one generation run, keyed by the model's identity (its files' contents, as the model
    store keys it) and the settings, so answers of an earlier model (retrained since) or other settings are never
    resumed into this one, and an unchanged model's are, however its files' times moved. The batch size is a
    setting: each engine call seeds its sampling and draws for its whole batch, so sampled answers depend on how
    prompts were batched, and a file resumed at another batch size would hold answers that neither gives."""
    # both steps start here: a damaged model fails naming its file before any engine loads
    identity = model_identity(model_dir)
    h = hashlib.sha256(json.dumps([identity, *(str(s) for s in settings)]).encode())
    return progress_file(out_path, h.hexdigest()[:12])


def drop_progress(out_path: str | Path) -> None:
    """The output is complete: its progress files go, this run's and any left by an earlier model's run."""
    for f in progress_files(out_path):
        f.unlink(missing_ok=True)


def _encode(tokenizer, messages: list[dict]) -> list[int]:
    # the same conversation shape as in training (an empty system turn where the template has one)
    ids = tokenizer.apply_chat_template(with_system_turn(tokenizer, messages), add_generation_prompt=True,
                                        tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def _generate(engine, prompts: list[list[int]], sampling: Sampling, meter: ProgressLog) -> list[list[int]]:
    """engine.generate, reporting each finished sequence to `meter` when the engine can."""
    if "on_finished" in inspect.signature(engine.generate).parameters:
        return engine.generate(prompts, sampling, on_finished=meter.update)
    outs = engine.generate(prompts, sampling)
    meter.update(len(prompts))
    return outs


def load_mt_bench_questions(path: str | Path) -> list[dict]:
    rows = read_jsonl(path)
    for i, q in enumerate(rows, 1):
        for key in ("question_id", "category", "turns"):
            if key not in q:
                raise UserError(f"{path}:{i}: question has no '{key}' key")
    return rows


def generate_mt_bench(model_dir, question_path, out_path, model_id, max_new_tokens=1024,
                      batch_size=8, device=None, seed=0, engine=None) -> Path:
    """Answer every MT-Bench question (turn 2 sees turn 1) in FastChat's answer format."""
    questions = load_mt_bench_questions(question_path)
    progress = progress_path(out_path, model_dir, model_id, max_new_tokens, seed, batch_size, json.dumps(questions))
    done = {r["question_id"]: r for r in read_jsonl(progress, repair=True)}
    todo = [q for q in questions if q["question_id"] not in done]
    log.info("MT-Bench: %d questions, %d already answered, %d to go", len(questions), len(done), len(todo))
    if todo:
        engine = engine or load_engine(model_dir, device=device, batch_size=batch_size)
        tok = engine.tokenizer
        meter = ProgressLog("MT-Bench answers (turns)", sum(len(q["turns"]) for q in questions),
                               done=sum(len(q["turns"]) for q in questions if q["question_id"] in done), logger=log)
        # Batch questions that share a temperature; a batch is the unit of resumption.
        by_temp: dict[float, list[dict]] = {}
        for q in todo:
            by_temp.setdefault(MT_BENCH_TEMPERATURE.get(q["category"], 0.7), []).append(q)
        for temp, qs in by_temp.items():
            sampling = Sampling(temperature=temp, top_k=FASTCHAT_TOP_K, max_new_tokens=max_new_tokens, seed=seed)
            for start in range(0, len(qs), max(batch_size, CHUNK)):
                chunk = qs[start : start + max(batch_size, CHUNK)]
                convs = [[] for _ in chunk]
                answers = [[] for _ in chunk]
                for turn in range(max(len(q["turns"]) for q in chunk)):
                    live = [k for k, q in enumerate(chunk) if turn < len(q["turns"])]
                    for k in live:
                        convs[k].append({"role": "user", "content": chunk[k]["turns"][turn]})
                    outs = _generate(engine, [_encode(tok, convs[k]) for k in live], sampling, meter)
                    for k, ids in zip(live, outs):
                        text = _decode(tok, ids)
                        convs[k].append({"role": "assistant", "content": text})
                        answers[k].append(text)
                with open(progress, "a", encoding="utf-8") as fh:
                    for q, turns in zip(chunk, answers):
                        append_jsonl(progress, {
                            "question_id": q["question_id"],
                            "answer_id": uuid.uuid4().hex[:22],
                            "model_id": model_id,
                            "choices": [{"index": 0, "turns": turns}],
                            "tstamp": time.time(),
                        }, fh=fh)
                log.info("MT-Bench: answered %d/%d", len(read_jsonl(progress)), len(questions))
    done = {r["question_id"]: r for r in read_jsonl(progress)}
    write_jsonl(out_path, (done[q["question_id"]] for q in questions))
    drop_progress(out_path)
    return Path(out_path)


def load_alpaca_eval_instructions(path: str | Path) -> list[dict]:
    try:
        rows = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(rows, list):
        raise UserError(f"{path}: expected a JSON list of examples")
    for i, r in enumerate(rows):
        if "instruction" not in r:
            raise UserError(f"{path}: example {i} has no 'instruction' key")
    return rows


def generate_alpaca_eval(model_dir, instructions_path, out_path, generator, temperature=0.7, top_p=1.0,
                         max_new_tokens=2048, batch_size=8, device=None, seed=0, engine=None, top_k=50) -> Path:
    """Write alpaca_eval's model-outputs JSON (instruction, output, generator, dataset) in the data's order."""
    examples = load_alpaca_eval_instructions(instructions_path)
    progress = progress_path(out_path, model_dir, generator, temperature, top_p, top_k, max_new_tokens, seed,
                             batch_size, json.dumps(examples))
    done = {r["index"]: r for r in read_jsonl(progress, repair=True)}
    todo = [i for i in range(len(examples)) if i not in done]
    log.info("AlpacaEval: %d instructions, %d done, %d to go", len(examples), len(done), len(todo))
    if todo:
        engine = engine or load_engine(model_dir, device=device, batch_size=batch_size)
        tok = engine.tokenizer
        sampling = Sampling(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                            seed=seed)
        meter = ProgressLog("AlpacaEval outputs", len(examples), done=len(done), logger=log)
        step = max(batch_size, CHUNK)
        for start in range(0, len(todo), step):
            chunk = todo[start : start + step]
            prompts = [_encode(tok, [{"role": "user", "content": examples[i]["instruction"]}]) for i in chunk]
            outs = _generate(engine, prompts, sampling, meter)
            with open(progress, "a", encoding="utf-8") as fh:
                for i, ids in zip(chunk, outs):
                    append_jsonl(progress, {"index": i, "output": _decode(tok, ids)}, fh=fh)
            log.info("AlpacaEval: %d/%d", min(start + step, len(todo)) + len(done), len(examples))
    done = {r["index"]: r for r in read_jsonl(progress)}
    outputs = [
        {"instruction": ex["instruction"], "output": done[i]["output"], "generator": generator,
         "dataset": ex.get("dataset", "alpaca_eval")}
        for i, ex in enumerate(examples)
    ]
    write_json(out_path, outputs)
    drop_progress(out_path)
    return Path(out_path)

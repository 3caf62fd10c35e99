"""Progress in the logs: training (step i/N, loss, tokens/s, elapsed, ETA; TensorBoard event files),
generation and judging (i/N, ETA, the judge's spend); the kernel check before a GPU model loads."""

from __future__ import annotations

import importlib.util
import json
import logging
import re

import pytest

from mamba_align.eval import generate
from mamba_align.model import kernels
from mamba_align.utils import ProgressLog, UserError, format_duration


def test_progress_log_lines_have_count_elapsed_and_eta(caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    clock = iter(range(0, 1000, 10))  # 10 s per reading
    monkeypatch.setattr("mamba_align.utils.time.monotonic", lambda: next(clock))
    p = ProgressLog("things", 100, done=20, every_s=1e9, every_frac=0.05, extra=lambda: "spent 3 tokens")
    for _ in range(80):
        p.update()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 16  # every 5 of 100, and the end
    assert lines[0].startswith("things: 25/100 (25%) | elapsed ") and "| ETA " in lines[0]
    assert lines[-1].startswith("things: 100/100 (100%)") and lines[-1].endswith("ETA 0:00:00 | spent 3 tokens")
    assert format_duration(3723) == "1:02:03" and format_duration(None) == "?"


def test_progress_log_every_30_seconds(caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    now = [0.0]
    monkeypatch.setattr("mamba_align.utils.time.monotonic", lambda: now[0])
    p = ProgressLog("slow", 10_000)
    for t in (5, 20, 31, 40, 62):
        now[0] = t
        p.update()
    assert [r.getMessage().split(" |")[0] for r in caplog.records] == ["slow: 3/10000 (0%)", "slow: 5/10000 (0%)"]


class CountingEngine:
    """An engine that reports finished sequences one at a time, as the real ones do."""

    class tokenizer:
        chat_template = "{{ user }}"

        @staticmethod
        def apply_chat_template(messages, add_generation_prompt, tokenize):
            return list(json.dumps(messages).encode())

        @staticmethod
        def decode(ids, skip_special_tokens=True):
            return bytes(ids).decode()

    def generate(self, prompts, sampling, on_finished=None):
        outs = []
        for _ in prompts:
            outs.append(list(b"ok"))
            on_finished(1)
        return outs


def test_generation_logs_count_and_eta(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    (tmp_path / "model").mkdir()
    q = tmp_path / "question.jsonl"
    q.write_text("".join(json.dumps({"question_id": i, "category": "writing", "turns": ["a", "b"]}) + "\n"
                         for i in range(40)))
    generate.generate_mt_bench(tmp_path / "model", q, tmp_path / "a.jsonl", "m", engine=CountingEngine())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("MT-Bench answers")]
    assert len(lines) >= 20 and lines[-1].startswith("MT-Bench answers (turns): 80/80 (100%)"), lines
    assert all("| ETA " in x and "| elapsed " in x for x in lines)

    caplog.clear()
    data = tmp_path / "alpaca_eval.json"
    data.write_text(json.dumps([{"instruction": f"i{i}"} for i in range(40)]))
    generate.generate_alpaca_eval(tmp_path / "model", data, tmp_path / "o.json", "m", engine=CountingEngine())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("AlpacaEval outputs")]
    assert len(lines) == 20 and lines[-1].startswith("AlpacaEval outputs: 40/40 (100%)"), lines


def test_judge_logs_count_eta_and_spend(tmp_path, caplog, monkeypatch):
    from fake_openai import KEY, FakeOpenAI, judge_cfg

    from mamba_align.eval.judge.client import JudgeClient

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    caplog.set_level(logging.INFO)
    reqs = [{"messages": [{"role": "user", "content": f"q {i}"}]} for i in range(20)]
    with FakeOpenAI(lambda body: "Rating: [[7]]") as fake:
        with JudgeClient(judge_cfg(), tmp_path / "c.jsonl", base_url=fake.base_url, prices=(30.0, 60.0)) as judge:
            judge.complete_many(reqs)
    lines = [r.getMessage() for r in caplog.records if re.match(r"judge gpt-4: \d+/", r.getMessage())]
    assert len(lines) == 20 and lines[-1].startswith("judge gpt-4: 20/20 (100%)"), lines
    m = re.search(r"spent ([\d,]+) prompt \+ ([\d,]+) completion tokens \(\$([\d.]+)\)", lines[-1])
    assert m, lines[-1]
    tin, tout = (int(g.replace(",", "")) for g in m.groups()[:2])
    assert tin > 0 and tout > 0 and float(m.group(3)) == pytest.approx((tin * 30 + tout * 60) / 1e6, abs=0.006)


def test_training_logs_progress_and_writes_tensorboard_events(tmp_path, caplog, monkeypatch):
    from test_train import DEMO, bench

    from mamba_align.train.job import TrainJob
    from mamba_align.train.launch import train
    from mamba_align.train.recipes import load_recipe

    bench.write_model(tmp_path / "model", **bench.SHAPES["tiny"])
    bench.write_sft_rows(tmp_path / "train.parquet", 64, bench.words(512)[:40], seed=0)
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    caplog.set_level(logging.INFO)
    recipe = load_recipe(DEMO, "sft", {"max_steps": 4, "logging_steps": 2, "save_steps": 100})
    train(TrainJob(stage="sft", recipe=recipe, model=tmp_path / "model", train=tmp_path / "train.parquet", test=None,
                   out=tmp_path / "sft", checkpoints=tmp_path / "ckpt", metrics=tmp_path / "metrics.json"))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sft progress: ")]
    assert [x.split(" (")[0] for x in lines] == ["sft progress: step 1/4", "sft progress: step 2/4",
                                                 "sft progress: step 4/4"], lines
    for x in lines:
        assert re.search(r"\| loss \d+\.\d{4} \| [\d,]+ tokens/s \| elapsed \d+:\d\d:\d\d \| "
                         r"ETA (\d+:\d\d:\d\d|\?)$", x), x
    assert lines[-1].endswith("ETA 0:00:00")
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_report_to_is_operational_and_checked():
    from test_train import DEMO

    from mamba_align.train.recipes import OPERATIONAL_KEYS, load_recipe

    assert "report_to" in OPERATIONAL_KEYS  # changing it reruns nothing
    assert load_recipe(DEMO, "sft").report_to == ["tensorboard"]
    with pytest.raises(UserError, match="report_to"):
        load_recipe(DEMO, "sft", {"report_to": "wandb"})


# ------------------------------------------------------------------------------------------------ kernels

@pytest.fixture
def cuda_without_kernels(monkeypatch):
    import torch

    real = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("mamba_ssm", "causal_conv1d") else real(name, *a))
    monkeypatch.delenv(kernels.ALLOW_SLOW_PATH_ENV, raising=False)


def test_cuda_without_kernels_fails_before_training_loads_a_model(cuda_without_kernels, tmp_path):
    from test_train import DEMO

    from mamba_align.train.job import TrainJob
    from mamba_align.train.launch import train
    from mamba_align.train.recipes import load_recipe

    with pytest.raises(UserError) as e:  # the model folder does not even exist: nothing was loaded
        train(TrainJob(stage="sft", recipe=load_recipe(DEMO, "sft"), model=tmp_path / "no-model",
                       train=tmp_path / "t.parquet", test=None, out=tmp_path / "o", checkpoints=tmp_path / "c",
                       metrics=tmp_path / "m.json"))
    msg = str(e.value)
    assert "mamba-ssm and causal-conv1d are not installed" in msg and "MAMBA_ALIGN_ALLOW_SLOW_PATH=1" in msg


def test_cuda_without_kernels_fails_before_generation_loads_a_model(cuda_without_kernels, tmp_path):
    from mamba_align.eval.engine import load_engine

    with pytest.raises(UserError, match="generation on CUDA needs the Mamba kernels"):
        load_engine(str(tmp_path / "no-model"))


def test_slow_path_opt_out_warns(cuda_without_kernels, monkeypatch, caplog):
    monkeypatch.setenv(kernels.ALLOW_SLOW_PATH_ENV, "1")
    caplog.set_level(logging.WARNING)
    kernels.require_kernels("training (sft)")
    assert "slow path" in caplog.text


def test_no_check_without_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(kernels.importlib.util, "find_spec", lambda name, *a: None)
    kernels.require_kernels("training (sft)")


def test_the_continuous_batching_loop_reports_each_finished_sequence():
    import random

    from test_engine import run_toy

    rng = random.Random(3)
    prompts = [[rng.randrange(31) for _ in range(rng.randint(1, 12))] for _ in range(23)]
    finished = []
    out, _ = run_toy(prompts, 40, 4, 4, on_finished=finished.append)
    assert sum(finished) == len(prompts) == len(out) and len(finished) > 3  # as they end, not once at the end

"""The plan against hand-computed numbers for a small config."""

import json
import math
from pathlib import Path

import pytest

from mamba_align import cli
from mamba_align.ops.reporting import plan
from mamba_align.train import sizes
from mamba_align.utils import UserError

CFG = {
    "base_model": {"source": "state-spaces/mamba-2.8b-slimpj"},
    "judge": {"repeats": 1},
    "eval": {"stages": ["sft", "dpo"], "mt_bench": {"max_new_tokens": 1024},
             "alpaca_eval": {"max_new_tokens": 2048, "annotators": ["alpaca_eval_gpt4"]}},
    "plan": {"safety_margin": 0.25, "max_job_minutes": 600, "judge_price_per_1m_input": 30.0,
             "judge_price_per_1m_output": 60.0},
}
SFT = {"dataset": {"source": "HuggingFaceH4/ultrachat_200k", "train_split": "train_sft", "max_train_samples": None},
       "num_train_epochs": 1, "max_seq_length": 2048, "packing": True, "per_device_train_batch_size": 4,
       "gradient_checkpointing": True}
DPO = {"dataset": {"source": "HuggingFaceH4/ultrafeedback_binarized", "train_split": "train_prefs",
                   "max_train_samples": None},
       "num_train_epochs": 3, "max_length": 1024, "precompute_ref_log_probs": False,
       "per_device_train_batch_size": 2, "gradient_checkpointing": True}


def test_sft_tokens_from_stats_with_packing():
    stats = {"train": {"tokens": 5000, "rows_out": 10}}
    tokens, source = plan.sft_tokens(SFT, stats)
    assert tokens == 3 * 2048  # ceil(5000 / 2048) packed rows of 2048
    assert "stats" in source


def test_dpo_tokens_count_the_reference_forward():
    stats = {"train": {"tokens": 1000, "rows_out": 10}}  # 100 tokens per pair
    tokens, _ = plan.dpo_tokens(DPO, stats)
    assert tokens == pytest.approx(2 * 10 * 100 * 3)  # the reference forward is inside the measured DPO rate
    tokens_pre, _ = plan.dpo_tokens(DPO | {"precompute_ref_log_probs": True}, stats)
    assert tokens_pre == pytest.approx(2 * 10 * 100 * 3 + 2 * 10 * 100 / 3)  # + one forward pass to precompute


def test_job_hours_runtime_and_split_by_hand():
    # 2e9 tokens on 8 A100s: 15620 * 0.45 tokens/s/GPU at 2.77B (SFT without checkpointing), x8 x0.943 efficiency
    # (measured per-GPU scaling of SFT on 2 GPUs)
    speed = 15620 * 0.45 * 8 * 0.943
    jp = plan.plan_job("train_sft", 2e9, 2.77e9, 8, "A100-80GB", margin=0.25, max_job_minutes=600)
    assert jp.hours == pytest.approx(2e9 / speed / 3600)
    assert jp.gpu_hours == pytest.approx(8 * jp.hours)
    full = math.ceil(jp.hours * 60 * 1.25 + 10)
    assert jp.runtime_min == 600 and jp.resubmissions == math.ceil(full / 600) - 1
    assert "resuming" in jp.note


def test_judge_requests_and_cost_by_hand():
    judge = plan.judge_cost(CFG, n_stages=2)
    assert judge["mt_bench"]["requests"] == 320
    assert judge["mt_bench"]["usd"] == pytest.approx(320 * (1300 * 30 + 250 * 60) / 1e6, abs=0.01)
    assert judge["alpaca_eval_gpt4"]["requests"] == 1610


def test_local_data_and_local_judge(tmp_path):
    (tmp_path / "question.jsonl").write_text('{"question_id": 1, "category": "math", "turns": ["a", "b"]}\n')
    cfg = CFG | {"judge": {"repeats": 1, "backend": "local"},
                 "eval": CFG["eval"] | {"mt_bench": {"max_new_tokens": 8, "local_dir": str(tmp_path)}}}
    judge = plan.judge_cost(cfg, n_stages=2)
    assert judge["mt_bench"]["requests"] == 4 and judge["mt_bench"]["usd"] == 0


def test_full_plan_and_memory_check():
    p = plan.make_plan(CFG, SFT, DPO, {"train_sft": 8, "train_dpo": 8}, "A100-80GB", results="/nonexistent")
    rules = [j["rule"] for j in p["jobs"]]
    assert rules.count("train_sft") == 1 and rules.count("generate_mt_bench") == 2
    sft = p["jobs"][0]
    assert sft["peak_mem_gib"] < 80 and sft["gpus"] == 8
    assert p["total_gpu_hours"] > 0 and "A100" in plan.format_plan(p)
    p40 = plan.make_plan(CFG, SFT, DPO, {"train_sft": 8}, "A100-40GB", results="/nonexistent")
    assert "exceeds" in p40["jobs"][0]["note"]


def test_unknown_dataset_asks_to_prepare_first():
    with pytest.raises(UserError, match="prepare the data first"):
        plan.sft_tokens(SFT | {"dataset": {"source": "me/unknown", "train_split": "train"}}, None)


def test_params_from_config_matches_a_real_model():
    import torch
    from transformers import MambaConfig, MambaForCausalLM

    cfg = MambaConfig(vocab_size=304, hidden_size=64, num_hidden_layers=2, state_size=16)
    n = sum(p.numel() for p in MambaForCausalLM(cfg).parameters())  # lm_head tied
    torch.manual_seed(0)
    assert sizes.params_from_config(cfg.to_dict()) == n


def test_command_line_plans_the_real_config(tmp_path, monkeypatch, workflow_copy):
    import json

    monkeypatch.chdir(workflow_copy)  # without results/: never the checkout's, which a demo run fills
    assert cli.main(["plan", "--out", str(tmp_path / "plan.json")]) == 0
    p = json.loads((tmp_path / "plan.json").read_text())
    assert p["gpu_type"] == "A100-80GB" and p["jobs"][0]["gpus"] == 8
    assert p["assumptions"]["safety_margin"] == 0.25  # the schema's default


def test_stage_throughput_and_checkpointing_by_hand():
    assert plan.train_throughput(2.77e9, "H100-80GB", "sft") == pytest.approx(15620)
    assert plan.train_throughput(2.77e9, "H100-80GB", "sft", checkpointing=True) == pytest.approx(15620 * 0.82)
    assert plan.train_throughput(2.77e9, "H100-80GB", "dpo", checkpointing=True) == pytest.approx(6820)
    assert plan.train_throughput(2.77e9, "A100-80GB", "dpo", checkpointing=False) == pytest.approx(
        6820 / 0.82 * 0.45)
    assert plan.train_throughput(1.385e9, "H100-80GB", "dpo_precomputed_ref", True) == pytest.approx(2 * 9435)


def test_disk_per_stage_by_hand():
    # measured at 2.77B: a checkpoint is 33.2 GB with AdamW, 22.15 GB with RMSprop
    assert sizes.checkpoint_gb(2.768e9, "adamw_torch") == pytest.approx(33.2, abs=0.05)
    assert sizes.checkpoint_gb(2.768e9, "rmsprop") == pytest.approx(22.15, abs=0.05)
    # 2 kept + 1 being written + the final fp32 model
    assert sizes.disk_gb(2.768e9, {"optim": "adamw_torch", "save_total_limit": 2}) == pytest.approx(
        3 * 33.216 + 11.072, abs=0.01)
    # a run of max_steps holds fewer where it saves fewer times: the rehearsal's 30 steps, a save every 10
    short = {"optim": "adamw_torch", "save_total_limit": 2, "max_steps": 30, "save_steps": 10}
    assert sizes.checkpoints_at_peak(short) == 3
    assert sizes.checkpoints_at_peak(short | {"save_total_limit": 1}) == 2
    assert sizes.checkpoints_at_peak(short | {"save_steps": 50}) == 1  # the last step's save only
    assert sizes.checkpoints_at_peak(short, kept=1, done_step=20) == 2  # resumed at 20: one save ahead
    assert sizes.disk_gb(2.768e9, short | {"save_total_limit": 1}) == pytest.approx(2 * 33.216 + 11.072, abs=0.01)


def test_dpo_memory_counts_the_reference_model_unless_precomputed():
    cfg = CFG | {"plan": CFG["plan"]}
    gpus = {"train_sft": 1, "train_dpo": 1}
    with_ref = plan.make_plan(cfg, SFT | {"save_total_limit": 2, "optim": "adamw_torch"},
                              DPO | {"save_total_limit": 2, "optim": "rmsprop"}, gpus, "H100-80GB", "/nonexistent")
    pre = plan.make_plan(cfg, SFT | {"save_total_limit": 2, "optim": "adamw_torch"},
                         DPO | {"save_total_limit": 2, "optim": "rmsprop", "precompute_ref_log_probs": True},
                         gpus, "H100-80GB", "/nonexistent")
    mem = {p["rule"]: p["peak_mem_gib"] for p in with_ref["jobs"]}, {p["rule"]: p["peak_mem_gib"] for p in pre["jobs"]}
    assert mem[0]["train_dpo"] - mem[1]["train_dpo"] == pytest.approx(2.77e9 * 4 / 2**30, abs=0.1)
    assert mem[0]["train_sft"] == mem[1]["train_sft"]


def test_memory_model_reproduces_the_measured_peaks():
    """docs/benchmarks.md section 8 (2.8B shape, gradient accumulation, DDP on 2 x H200) and issue #17's table:
    SFT 2 x 2,048 tokens per device 64.39 GiB, 4 x 2,048 81.2 GiB; DPO 2 pairs with checkpointing and the
    reference model 51.67 GiB."""
    assert sizes.train_memory_gib(2.77e9, 2 * 2048, False, "adamw_torch") == pytest.approx(64.39, abs=0.05)
    assert sizes.train_memory_gib(2.77e9, 4 * 2048, False, "adamw_torch") == pytest.approx(81.2, abs=0.05)
    assert sizes.train_memory_gib(2.77e9, 2 * 2 * 1024, True, "rmsprop") + 2.77e9 * 4 / 2**30 == \
        pytest.approx(51.67, abs=0.05)
    dpo = {"per_device_train_batch_size": 2, "gradient_checkpointing": True, "max_length": 1024, "optim": "rmsprop"}
    assert sizes.stage_memory_gib(2.77e9, dpo, "dpo") == pytest.approx(51.67, abs=0.05)


def test_a_recipe_that_does_not_fit_gets_the_fix_named(tmp_path):
    sft = {"per_device_train_batch_size": 4, "gradient_checkpointing": False, "max_seq_length": 2048,
           "optim": "adamw_torch", "global_batch_size": 512}
    fix = sizes.memory_fix(2.77e9, sft, "sft", 8, 80)  # 81.2 GiB modelled > 76 of 80
    assert "81.2 GiB" in fix and "per_device_train_batch_size: 2" in fix
    assert sizes.memory_fix(2.77e9, sft | {"per_device_train_batch_size": 2}, "sft", 8, 80) is None
    # a 1B model on a 20 GB GPU fits only with checkpointing; the 2.8B one never fits 40 GB unsharded
    assert "gradient_checkpointing: true" in sizes.memory_fix(1e9, sft | {"per_device_train_batch_size": 1}, "sft",
                                                              8, 20)
    assert "even at per-device batch 1" in sizes.memory_fix(2.77e9, sft, "sft", 8, 24)
    jobs = plan.make_plan(CFG, SFT | sft | {"save_total_limit": 2}, DPO | {"save_total_limit": 2, "optim": "rmsprop"},
                          {"train_sft": 8, "train_dpo": 8}, "A100-80GB", tmp_path)["jobs"]
    assert "DOES NOT FIT" in next(j["note"] for j in jobs if j["rule"] == "train_sft")


def test_the_shipped_recipes_fit_80_gb_at_the_2p8b_shape():
    from mamba_align.train.recipes import as_dict, load_recipe

    for name in ("zephyr-7b-beta", "zephyr-7b-beta-2024", "zephyr-7b-gemma"):
        for stage in ("sft", "dpo"):
            recipe = as_dict(load_recipe(f"config/recipes/{name}", stage))
            assert sizes.memory_fix(2.77e9, recipe, stage, 8, 80) is None, (name, stage)


def demo_leftovers(results: Path) -> None:
    """What `make demo` leaves in results/ that a plan reads: its tiny base model's verify.json (as
    model.convert.prepare_base_model writes it) and its prepared data's stats.json (as train.data writes them)."""
    results.mkdir(parents=True, exist_ok=True)
    (results / "models").mkdir(exist_ok=True)
    (results / "models" / "base.verify.json").write_text(json.dumps(
        {"source": "results/demo/base_mamba_ssm", "revision": "main", "n_params": 104_320}))
    for stage, source in (("sft", "results/demo/data/ultrachat"), ("dpo", "results/demo/data/ultrafeedback")):
        (results / "data" / stage).mkdir(parents=True)
        (results / "data" / stage / "stats.json").write_text(json.dumps(
            {"source": source, "revision": None, "train": {"split": "train", "rows_out": 80, "tokens": 4_000}}))


def test_a_demo_left_in_results_does_not_size_the_real_plan(tmp_path, monkeypatch, workflow_copy):
    """#29: after `make demo`, the default config's plan read the demo's tiny model (0.00B parameters, 0.0
    GPU-hours); it plans exactly as a fresh checkout does, and says which results it passed over."""
    monkeypatch.chdir(workflow_copy)
    assert cli.main(["plan", "--out", str(tmp_path / "fresh.json")]) == 0
    demo_leftovers(workflow_copy / "results")
    assert cli.main(["plan", "--out", str(tmp_path / "after_demo.json")]) == 0
    fresh, after = (json.loads((tmp_path / f).read_text()) for f in ("fresh.json", "after_demo.json"))
    notes = after.pop("notes")
    assert fresh.pop("notes") == []
    assert after == fresh
    # 27.7 + 3 x 0.42 leaderboard (A100); DPO at the precomputed reference's rate (precompute_ref_log_probs)
    assert after["base_params"] == 2.77e9 and after["total_gpu_hours"] == 29.0
    assert {j["rule"]: j["runtime_min"] for j in after["jobs"][:2]} == {"train_sft": 125, "train_dpo": 154}
    assert notes[0] == ("results/models/base is results/demo/base_mamba_ssm, not the configured "
                        "state-spaces/mamba-2.8b-slimpj: planned from the configured model")
    assert notes[1:] == [
        "results/data/sft is results/demo/data/ultrachat, not the configured HuggingFaceH4/ultrachat_200k: "
        "planned from the configured dataset",
        "results/data/dpo is results/demo/data/ultrafeedback, not the configured "
        "HuggingFaceH4/ultrafeedback_binarized: planned from the configured dataset"]
    text = plan.format_plan(after | {"notes": notes})
    assert "(2.77B parameters)" in text and "planned from the configured model" in text


def test_the_slurm_dry_run_after_a_demo_asks_the_real_runtimes(workflow_copy):
    """#29: `runtime=30` for train_sft after `make demo` (the plan's floor for a 100k-parameter model); a job
    given that limit dies at it, again and again."""
    from wfhelpers import snakemake

    demo_leftovers(workflow_copy / "results")
    out = snakemake(workflow_copy, "-n", "--profile", "profiles/slurm", "results/models/dpo").stdout
    runtimes = {}
    for rule in ("train_sft", "train_dpo"):
        block = out[out.index(f"rule {rule}:"):]
        runtimes[rule] = int(block.split("runtime=")[1].split(",")[0])
    assert runtimes == {"train_sft": 125, "train_dpo": 154}  # DPO precomputes (the default)


def test_a_prepared_model_or_dataset_of_the_configured_source_is_used(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "base.verify.json").write_text(json.dumps(
        {"source": "state-spaces/mamba-2.8b-slimpj", "revision": "main", "resolved_commit": "a" * 40,
         "n_params": 2_768_345_600}))
    (tmp_path / "data" / "sft").mkdir(parents=True)
    (tmp_path / "data" / "sft" / "stats.json").write_text(json.dumps(
        {"source": "HuggingFaceH4/ultrachat_200k", "revision": "main", "train": {"tokens": 5000, "rows_out": 10}}))
    notes = []
    for revision in ("main", "a" * 40):  # by name or by the commit it resolved to
        cfg = CFG | {"base_model": {"source": "state-spaces/mamba-2.8b-slimpj", "revision": revision}}
        assert plan.base_params(cfg, str(tmp_path), notes=notes) == 2_768_345_600
    assert plan.prepared_stats(tmp_path / "data" / "sft", SFT | {"dataset": SFT["dataset"] | {"revision": "main"}},
                               notes)["train"]["tokens"] == 5000
    assert notes == []
    cfg = CFG | {"base_model": {"source": "state-spaces/mamba-2.8b-slimpj", "revision": "b" * 40}}
    assert plan.base_params(cfg, str(tmp_path), notes=notes) == plan.KNOWN_PARAMS["state-spaces/mamba-2.8b-slimpj"]
    assert notes == [f"{tmp_path}/models/base is state-spaces/mamba-2.8b-slimpj@main, not the configured "
                     f"state-spaces/mamba-2.8b-slimpj@{'b' * 40}: planned from the configured model"]


def test_a_torn_verify_json_is_a_one_line_error(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "base.verify.json").write_text('{"source": ')
    with pytest.raises(UserError, match=r"base.verify.json: not valid JSON .*prepare again"):
        plan.base_params(CFG, str(tmp_path))


def test_the_plan_reads_the_effective_precompute_setting():
    """A recipe that leaves precompute_ref_log_probs unset (the published ones) is planned at the precomputed rate
    unless the config's training.precompute_ref_log_probs is false; a recipe's own value wins."""
    def dpo_rate(cfg, recipe):
        p = plan.make_plan(cfg, SFT, recipe, {"train_sft": 1, "train_dpo": 1}, "H100-80GB", "/nonexistent")
        return p["assumptions"]["train_tokens_per_s_per_gpu"]["train_dpo"]

    unset, off = DPO | {"precompute_ref_log_probs": None}, CFG | {"training": {"precompute_ref_log_probs": False}}
    assert dpo_rate(CFG, unset) == 9435 and dpo_rate(off, unset) == 6820
    assert dpo_rate(off, DPO | {"precompute_ref_log_probs": True}) == 9435 and dpo_rate(CFG, DPO) == 6820


def test_the_plan_reads_the_config_as_status_does_without_the_chat_template():
    """One load_config (provenance) serves both; the plan's asks for no chat template (it never read one), and
    naming config/config.yaml itself merges it once."""
    from mamba_align.ops.store.provenance import load_config

    repo = Path(__file__).resolve().parents[1]
    planned, files = load_config(["config/config.yaml"], repo, resolve_template=False)
    assert files == [repo / "config" / "config.yaml"]
    assert planned["base_model"].get("chat_template") is None
    status_cfg, _ = load_config([], repo)
    assert status_cfg["base_model"]["chat_template"] and {**status_cfg, "base_model": planned["base_model"]} == planned

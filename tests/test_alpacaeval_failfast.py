"""AlpacaEval's judge fails fast and cheaply, as MT-Bench's does (issue #28 §5): an unusable answer (HTTP 200 with
no choices, or a body that is not JSON) is asked again at most twice, every answered call is in the spend and the
progress line, a judgment still unusable after that, or UNUSABLE_LIMIT unusable answers in a row, stop the job with
a UserError naming the URL and quoting the endpoint, and answers obtained before a stop are not paid for again.
Billed calls are counted as the requests the fake server received."""

from __future__ import annotations

import re

import pytest
from fake_openai import FakeOpenAI
from test_alpacaeval import judge_cfg, judge_responder, make_data_dir, write_outputs

from mamba_align.eval import alpacaeval
from mamba_align.eval.judge.client import REASKS, UNUSABLE_LIMIT
from mamba_align.utils import UserError

# each fault's body, as quoted
WORDS = {"empty": '"choices": []', "garbage": '{"id": "chatcmpl-garbage"', "no_content": '"content": null'}
SPEND = re.compile(r"spent ([\d,]+) prompt \+ ([\d,]+) completion tokens in (\d+) answered calls")


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("FAKE_JUDGE_KEY", "sk-alpaca-failfast-0123456789")


@pytest.fixture
def data_dir(tmp_path):
    return make_data_dir(tmp_path)


def judge(fake, tmp_path, data_dir, annotator="alpaca_eval_gpt4", **cfg):
    return alpacaeval.judge_alpaca_eval(write_outputs(tmp_path / "o.json"), data_dir, [annotator],
                                        judge_cfg(**cfg), tmp_path / "m.json", tmp_path / "cache",
                                        base_url=fake.base_url)


def spent(text: str) -> tuple[int, int, int]:
    """(prompt tokens, completion tokens, answered calls) of the last spend in `text`."""
    *_, m = SPEND.finditer(text)
    return int(m.group(1).replace(",", "")), int(m.group(2).replace(",", "")), int(m.group(3))


@pytest.mark.parametrize("fault", ["empty", "garbage", "no_content"])
@pytest.mark.parametrize("concurrency", [1, 3])
def test_an_unusable_endpoint_stops_the_job_after_a_few_billed_calls_naming_the_url(tmp_path, data_dir, fault,
                                                                                   concurrency):
    """Was: "empty" -- a whole chunk billed (16 calls), then `ValueError: Length of values (0) does not match length
    of index (8)`; "garbage" -- a bare JSONDecodeError; "no_content" -- a null judgment left out of the scores,
    unasked again. None named the endpoint, nor counted its spend."""
    with FakeOpenAI(faults={fault: 1.0}, delay_s=0.02) as fake:
        url = fake.base_url
        with pytest.raises(UserError) as err:
            judge(fake, tmp_path, data_dir, concurrency=concurrency)
    msg = str(err.value)
    # alone, a judgment that stays unusable stops the job (alpaca_eval cannot leave it out); side by side, the
    # UNUSABLE_LIMIT-th unusable answer in a row may come first, and the calls in flight then still land
    assert len(fake.log) <= UNUSABLE_LIMIT + concurrency - 1 <= UNUSABLE_LIMIT + REASKS
    if concurrency == 1:
        assert len(fake.log) == REASKS + 1 and "(asked 3 times)" in msg
    why = "(no choices|no message content|JSONDecodeError: .*)"
    assert re.match(rf"judging stopped: ({UNUSABLE_LIMIT} unusable answers in a row; the last: )?unusable answer "
                    rf"from {re.escape(url)}/chat/completions \({why}\): ", msg), msg
    assert WORDS[fault] in msg
    assert spent(msg) == (fake.tokens_sent["prompt_tokens"], fake.tokens_sent["completion_tokens"], len(fake.log))
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("fault", ["empty", "garbage"])
def test_an_unusable_logprobs_probe_stops_the_job_after_three_calls(tmp_path, data_dir, fault):
    """The weighted annotator's probe asks first: was a bare JSONDecodeError ("garbage"), or a silent fallback to
    the ranking annotator that then paid for a chunk of empty answers ("empty")."""
    with FakeOpenAI(faults={fault: 1.0}) as fake:
        url = fake.base_url
        with pytest.raises(UserError, match=rf"judging stopped: unusable answer from {re.escape(url)}/chat/"
                                            rf"completions \(.*{re.escape(WORDS[fault])}.*\(asked 3 times\)"):
            judge(fake, tmp_path, data_dir, annotator="weighted_alpaca_eval_gpt4_turbo")
    assert len(fake.log) == REASKS + 1


def test_a_good_endpoint_is_unaffected_and_its_progress_line_has_the_spend(tmp_path, data_dir, caplog):
    caplog.set_level("INFO")
    with FakeOpenAI(judge_responder) as fake:
        m = judge(fake, tmp_path, data_dir)
    assert m["results"]["alpaca_eval_gpt4"]["win_rate"] == 75.0 and len(fake.log) == 8
    [line] = [r.getMessage() for r in caplog.records
              if r.getMessage().startswith("judge alpaca_eval_gpt4 fake-judge: 8/8 (100%)")]
    assert "ETA" in line
    assert spent(line) == (fake.tokens_sent["prompt_tokens"], fake.tokens_sent["completion_tokens"], 8)


def test_an_unusable_answer_now_and_then_is_asked_again_and_counted(tmp_path, data_dir, caplog):
    """Was: the first empty answer lost its whole chunk (ValueError)."""
    caplog.set_level("INFO")
    with FakeOpenAI(judge_responder, faults={"empty": 0.3}, seed=2) as fake:
        m = judge(fake, tmp_path, data_dir)
    n_empty = sum(r.fault == "empty" for r in fake.log)
    assert n_empty > 0 and len(fake.log) == 8 + n_empty
    assert m["results"]["alpaca_eval_gpt4"]["n"] == 8 and m["results"]["alpaca_eval_gpt4"]["win_rate"] == 75.0
    assert spent(caplog.text) == (fake.tokens_sent["prompt_tokens"], fake.tokens_sent["completion_tokens"],
                                  len(fake.log))


def test_a_rerun_after_a_stop_pays_only_for_the_judgments_not_obtained(tmp_path, data_dir):
    """Three good answers, then the endpoint answers nothing usable. alpaca_eval saved only the first chunk (two);
    the third answer, whose chunk never finished, was paid for and is not asked again."""

    def good_three_times(body):
        if len(fake.log) >= 3:
            fake.faults = {"empty": 1.0}  # from the next request on
        return judge_responder(body)

    with FakeOpenAI(good_three_times) as fake:
        with pytest.raises(UserError, match=r"judging stopped: .* The 3 answers obtained are kept in .*"
                                            r"judge_responses.jsonl"):
            judge(fake, tmp_path, data_dir, chunksize=2)
        assert len(fake.log) == 3 + REASKS + 1
        fake.responder, fake.faults = judge_responder, {}
        fake.reset()
        m = judge(fake, tmp_path, data_dir, chunksize=2)
    assert len(fake.log) == 8 - 3
    r = m["results"]["alpaca_eval_gpt4"]
    assert (r["n"], r["win_rate"]) == (8, 75.0)

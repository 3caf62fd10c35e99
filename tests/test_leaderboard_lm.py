"""lm-eval's `mamba_align` model class against lm-eval's stock `hf` model (HFLM) on a tiny Mamba: the same
per-sample log-likelihoods, task scores and greedy generations, with each shared context read once. GPU
tests (marked `gpu`) compare the mamba_ssm path with the transformers path."""

from __future__ import annotations

import importlib.util
import json
import math
import random
from types import SimpleNamespace

import pytest
import torch

from mamba_align.eval.leaderboard import scoring as S

WORDS = ("the cat dog bird fish horse cow sat ran on a mat in sun red blue green is happy and rests "
         "question answer which one of these what colour animal").split()
HAS_GPU_KIT = torch.cuda.is_available() and all(
    importlib.util.find_spec(m) is not None for m in ("mamba_ssm", "causal_conv1d"))


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny transformers Mamba checkpoint with a GPT-NeoX-layout tokenizer and the zephyr chat template."""
    from transformers import AutoTokenizer, MambaConfig, MambaForCausalLM

    from mamba_align.model.tokenizer import CHAT_TEMPLATES, PAD_TOKEN
    from mamba_align.testing.demo import build_tiny_tokenizer

    out = tmp_path_factory.mktemp("tiny_mamba")
    rng = random.Random(0)
    build_tiny_tokenizer(out / "tok", [sentence(rng, 12) + "." for _ in range(300)], vocab_size=200)
    tok = AutoTokenizer.from_pretrained(out / "tok")
    tok.pad_token = PAD_TOKEN
    tok.chat_template = CHAT_TEMPLATES["zephyr"]
    torch.manual_seed(0)
    config = MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=len(tok), state_size=8, expand=2,
                         conv_kernel=4, time_step_rank=4, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    model = MambaForCausalLM(config)
    with torch.no_grad():  # peaked next-token distributions: greedy decoding has no near-ties
        model.backbone.embeddings.weight.mul_(20.0)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    return out / "model"


@pytest.fixture(scope="module")
def ours(model_dir):
    from mamba_align.eval.leaderboard.lm import MambaAlignLM

    return MambaAlignLM(str(model_dir), device="cpu", batch_size=8, dtype="float32")


@pytest.fixture(scope="module")
def stock(model_dir):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(model_dir), device="cpu", batch_size=3, dtype="float32")


def ll_instances(pairs):
    from lm_eval.api.instance import Instance

    return [Instance("loglikelihood", {}, (ctx, cont), i) for i, (ctx, cont) in enumerate(pairs)]


def mc_pairs(seed=0, questions=5, choices=4):
    """Shared contexts of different lengths (padding in a prefill batch), choices of 1-6 words, and a few
    unique contexts and an empty one (scored by a plain forward)."""
    rng = random.Random(seed)
    pairs = []
    for q in range(questions):
        ctx = sentence(rng, 6 + 9 * q) + ". Question: which one?\nAnswer:"
        pairs += [(ctx, " " + sentence(rng, rng.randint(1, 6))) for _ in range(choices)]
    pairs += [(sentence(rng, 5) + ".", " " + sentence(rng, 12)), ("", "the cat sat"), ("red", " blue")]
    return pairs


# ------------------------------------------------------------------------------------------------- CPU


def test_loglikelihoods_equal_stock_hflm(ours, stock):
    from lm_eval.api.instance import Instance

    ctx = "the cat sat on a mat. Question: which one?\nAnswer:"
    greedy = stock.generate_until([Instance("generate_until", {}, (ctx, {"until": [], "max_gen_toks": 3}), 0)])[0]
    reqs = ll_instances(mc_pairs() + [(ctx, greedy), (ctx, " the"), (ctx, greedy + " cat")])
    got, want = ours.loglikelihood(reqs), stock.loglikelihood(reqs)
    assert len(got) == len(want) == len(reqs)
    for (lp, greedy), (lp_ref, greedy_ref) in zip(got, want, strict=True):
        assert lp == pytest.approx(lp_ref, rel=1e-5, abs=1e-4)
        assert greedy == greedy_ref
    assert any(g for _, g in want) and not all(g for _, g in want)  # the greedy flag is exercised both ways


def test_batched_encoding_gives_templatelm_token_ids(ours, monkeypatch):
    from lm_eval.api.model import TemplateLM

    bos = ours.tokenizer.decode(ours.prefix_token_id)
    pairs = mc_pairs() + [("trailing spaces  ", "x"), (bos + "a context with BOS", " yes"), ("", " cat")]
    reqs = ll_instances(pairs)
    seen = []
    monkeypatch.setattr(ours, "_loglikelihood_tokens", lambda new, disable_tqdm=False: seen.append(new) or [])
    ours.loglikelihood(reqs)
    TemplateLM.loglikelihood(ours, reqs)  # lm-eval's own per-request encoding
    assert seen[0] == seen[1]


def test_mixed_context_lengths_in_one_prefill_batch(model_dir):
    """One batch of contexts from 3 to 40 tokens (left padding masked out of the state) scores as each
    context alone does."""
    from mamba_align.eval.leaderboard.lm import MambaAlignLM

    lm = MambaAlignLM(str(model_dir), device="cpu", batch_size=64, dtype="float32")
    reqs = ll_instances(mc_pairs(seed=1, questions=6, choices=3))
    together = lm.loglikelihood(reqs)
    lm.batch_rows = 3  # one context per batch: no padding
    alone = lm.loglikelihood(reqs)
    for (a, ga), (b, gb) in zip(together, alone, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-4) and ga == gb


def test_simple_evaluate_scores_equal_stock_hflm(ours, stock, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    rng = random.Random(2)
    docs = [{"question": sentence(rng, 8), "choices": [sentence(rng, rng.randint(1, 4)) for _ in range(4)],
             "answer": rng.randrange(4)} for _ in range(12)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'data.jsonl'}\n"
        "test_split: test\nfewshot_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    runs = [simple_evaluate(model=lm, tasks=["tiny_mc"], num_fewshot=3, log_samples=True,
                            task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False), random_seed=0,
                            fewshot_random_seed=0) for lm in (ours, stock)]
    got, want = (r["results"]["tiny_mc"] for r in runs)
    for metric in ("acc,none", "acc_norm,none"):
        assert got[metric] == want[metric]
    samples = [{s["doc_id"]: s for s in r["samples"]["tiny_mc"]} for r in runs]
    assert samples[0].keys() == samples[1].keys() and len(samples[0]) == 12
    for doc_id, s in samples[0].items():
        ref = samples[1][doc_id]
        assert s["arguments"] == ref["arguments"]
        for (lp, g), (lp_ref, g_ref) in zip((r[0] for r in s["resps"]), (r[0] for r in ref["resps"]), strict=True):
            assert float(lp) == pytest.approx(float(lp_ref), rel=1e-5, abs=1e-4) and g == g_ref


def test_chat_templated_generation_task_equals_stock_hflm(ours, stock, tmp_path):
    """A generate_until task as IFEval runs it: simple_evaluate(apply_chat_template=True) renders each prompt
    with the checkpoint's chat template; both classes see the same prompts and answer the same."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    rng = random.Random(7)
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"prompt": sentence(rng, 6) + "?"}) + "\n"
                                                 for _ in range(3)))
    (tmp_path / "tiny_gen.yaml").write_text(
        "task: tiny_gen\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'data.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: prompt\ndoc_to_target: \"\"\n"
        "generation_kwargs:\n  until: []\n  do_sample: false\n  max_gen_toks: 10\n"
        "metric_list:\n  - metric: exact_match\n")
    runs = [simple_evaluate(model=lm, tasks=["tiny_gen"], apply_chat_template=True, log_samples=True,
                            task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
            for lm in (ours, stock)]
    got, want = ({s["doc_id"]: (s["arguments"], s["resps"]) for s in r["samples"]["tiny_gen"]} for r in runs)
    assert got == want and len(got) == 3
    assert all(resps[0][0] for _, resps in got.values())  # something was generated
    prompt = next(iter(got.values()))[0]
    assert "<|user|>" in json.dumps(prompt) and "<|assistant|>" in json.dumps(prompt)


def generate_until_as_stock(ours, stock, contexts, max_gen_toks, at):
    """Greedy generate_until of `ours` against `stock`: the same texts free, and cut at stop strings taken from
    the free texts (at fraction `at` of each), so each cut really happens inside the text."""
    from lm_eval.api.instance import Instance

    free = [Instance("generate_until", {}, (c, {"until": [], "max_gen_toks": max_gen_toks, "do_sample": False}), i)
            for i, c in enumerate(contexts)]
    reference = stock.generate_until(free)
    assert ours.generate_until(free) == reference
    assert all(len(text) >= 4 for text in reference)
    stops = [text[int(len(text) * at) : int(len(text) * at) + 2] for text in reference]
    cut = [Instance("generate_until", {}, (c, {"until": [stop], "max_gen_toks": max_gen_toks}), i)
           for i, (c, stop) in enumerate(zip(contexts, stops, strict=True))]
    got = ours.generate_until(cut)
    assert got == stock.generate_until(cut)
    for text, full, stop in zip(got, reference, stops, strict=True):
        assert stop not in text and full.startswith(text) and len(text) < len(full)


def test_generate_until_cuts_at_until_and_matches_stock_greedy(ours, stock):
    rng = random.Random(3)
    generate_until_as_stock(ours, stock, [sentence(rng, n) for n in (3, 7, 12, 7)], 24, at=1 / 2)


def test_each_shared_context_is_read_once(model_dir, stock):
    """Every token position the model runs is counted at the embedding (a forward hook): one prefill per
    distinct context, then one step per choice and continuation token; HFLM reads context + continuation
    per choice."""
    from mamba_align.eval.leaderboard.lm import MambaAlignLM

    lm = MambaAlignLM(str(model_dir), device="cpu", batch_size=4, dtype="float32")  # one context per batch
    rng = random.Random(4)
    pairs = []
    for q in range(3):
        ctx = sentence(rng, 20 + 5 * q) + ". Answer:"
        pairs += [(ctx, " " + sentence(rng, k)) for k in (1, 2, 3, 5)]
    reqs = ll_instances(pairs)
    encoded = [lm._encode_pair(c, x) for c, x in pairs]

    def count_positions(model, run):
        seen = []
        hook = model.backbone.embeddings.register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
        try:
            result = run()
        finally:
            hook.remove()
        return sum(seen), result

    lm.scorer.stats.clear()
    ours_positions, got = count_positions(lm.engine.model, lambda: lm.loglikelihood(reqs))
    stock_positions, want = count_positions(stock.model, lambda: stock.loglikelihood(reqs))
    contexts = {tuple(ctx): 0 for ctx, _ in encoded}
    for ctx, cont in encoded:
        contexts[tuple(ctx)] = max(contexts[tuple(ctx)], len(cont))
    expected = sum(len(ctx) + 4 * (longest - 1) for ctx, longest in contexts.items())
    assert ours_positions == expected == lm.scorer.stats["positions"]
    assert lm.scorer.stats["prefill_tokens"] == sum(len(ctx) for ctx in contexts)
    assert stock_positions >= sum(len(ctx) + len(cont) - 1 for ctx, cont in encoded) > 2 * ours_positions
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in want], rel=1e-5, abs=1e-4)


class FakeRunner:
    """The interface of eval/engine/ssm.py `_GraphRunner` on CPU: each slot's state is its token history,
    and logits come from a full forward of that history."""

    def __init__(self, model, slots):
        self.model, self.slots, self.device = model, slots, torch.device("cpu")
        self.history = [[] for _ in range(slots)]

    def _last_logits(self, seqs):
        return torch.stack([self.model(torch.tensor([s])).logits[0, -1] if s else torch.zeros(
            self.model.config.vocab_size) for s in seqs])

    def prefill(self, slots, prompts):
        assert len(set(slots)) == len(slots) and all(0 <= s < self.slots for s in slots)
        for s, p in zip(slots, prompts, strict=True):
            self.history[s] = list(p)
        return self._last_logits(prompts)

    def step(self, tokens):
        assert tokens.shape == (self.slots,)
        for s, t in enumerate(tokens.tolist()):
            if self.history[s]:
                self.history[s].append(t)
        return self._last_logits(self.history)

    def snapshot(self, slots):
        return SimpleNamespace(history=[list(self.history[s]) for s in slots])

    def copy_slots_from(self, other, src, dst):
        snapshot = [list(other.history[s]) for s in src]
        for d, h in zip(dst, snapshot, strict=True):
            self.history[d] = h


class FakeEngine:
    def __init__(self, model):
        self.model, self.device, self.runners = model, torch.device("cpu"), {}

    def _runner(self, slots):
        return self.runners.setdefault(slots, FakeRunner(self.model, slots))


@pytest.mark.parametrize("rows", [6, 4])  # 4: five choices per context, more than a batch has rows
def test_ssm_scorer_slot_bookkeeping_on_a_fake_runner(ours, rows):
    """SSMScorer's use of the graph runner (each context prefilled into its first row, copied to its other
    rows, idle slots padded, power-of-two slot counts, groups larger than a batch split) gives the transformers
    scorer's numbers."""
    enc = [ours._encode_pair(c, x) if c else ([0], ours.tok_encode(x)) for c, x in mc_pairs(seed=8, choices=5)]
    want = S.score(enc, S.HFScorer(ours.engine.model), max_rows=rows)
    engine = FakeEngine(ours.engine.model)
    with torch.inference_mode():
        got = S.score(enc, S.SSMScorer(engine, max_rows=rows), max_rows=rows)
    assert max(engine.runners) == rows and set(engine.runners) <= {1, 2, 4, rows}
    for (a, ga), (b, gb) in zip(got, want, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-4) and ga == gb


@pytest.mark.parametrize("conts, shared", [
    ([[1], [2, 3]], True),
    ([[1]], False),  # a unique context
    ([[1, 2, 3, 4], [5]], False),  # a continuation longer than the context
])
def test_uses_state_when_the_context_is_shared_and_long(conts, shared):
    assert S.uses_state([7, 8, 9], conts) is shared


def test_batches_respect_rows_and_padded_tokens():
    items = [(10, 3), (9, 3), (9, 2), (4, 4), (2, 1)]  # (context length, choices)
    batches = S._batches(items, lambda it: it[0], lambda it: it[1], max_rows=6, max_tokens=18)
    assert batches == [[(10, 3)], [(9, 3), (9, 2)], [(4, 4), (2, 1)]]


def test_batches_end_where_the_widths_cross_a_scan_chunk():
    items = [(4100, 1), (4000, 1), (1100, 1), (1025, 1), (1024, 1), (700, 1)]
    batches = S._batches(items, lambda it: it[0], lambda it: it[1], max_rows=64, max_tokens=10**6)
    assert batches == [[(4100, 1)], [(4000, 1)], [(1100, 1), (1025, 1)], [(1024, 1), (700, 1)]]


def test_rolling_loglikelihood_is_the_sum_over_the_text(ours, stock):
    from lm_eval.api.instance import Instance

    rng = random.Random(5)
    reqs = [Instance("loglikelihood_rolling", {}, (sentence(rng, n),), i) for i, n in enumerate((4, 30))]
    got, want = ours.loglikelihood_rolling(reqs), stock.loglikelihood_rolling(reqs)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-4)
    assert all(math.isfinite(x) and x < 0 for x in got)


def test_chat_template_is_the_checkpoints(ours, stock):
    chat = [{"role": "user", "content": "What colour is the cat?"}]
    assert ours.apply_chat_template(chat) == stock.apply_chat_template(chat)
    assert ours.apply_chat_template(chat).startswith("<|user|>\nWhat colour")
    assert ours.chat_template(True) == stock.chat_template(True)
    assert ours.tokenizer_name == stock.tokenizer_name


def test_registered_with_lm_eval_and_built_from_its_arguments(model_dir, monkeypatch):
    """As simple_evaluate(model="mamba_align", model_args="...", batch_size=..., device=...) builds it, also for
    `lm_eval --model mamba_align` outside the workflow: with the templates compiled once (leaderboard/run.py)."""
    import lm_eval.utils
    from lm_eval.api.registry import get_model

    from mamba_align.eval.leaderboard import run as lb_run
    from mamba_align.eval.leaderboard.lm import MambaAlignLM

    monkeypatch.setattr(lm_eval.utils, "apply_template", lambda template, doc: "lm-eval's own")  # restored after
    assert get_model("mamba_align") is MambaAlignLM
    lm = get_model("mamba_align").create_from_arg_string(
        f"pretrained={model_dir},dtype=float32,backend=transformers",
        {"batch_size": "auto", "max_batch_size": None, "device": "cpu"})
    assert lm.batch_size == 64 and lm.max_length == 2048 and lm.engine.name == "transformers"
    assert lm_eval.utils.apply_template is lb_run._apply_template
    lb_run.compile_templates_once()  # idempotent: evaluate_leaderboard installs it again over a model's
    assert lm_eval.utils.apply_template is lb_run._apply_template
    assert lm_eval.utils.apply_template("Q: {{q}}", {"q": "why?"}) == "Q: why?"
    with pytest.raises(ValueError, match="batch_size"):
        MambaAlignLM(str(model_dir), device="cpu", batch_size="many")


# ------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU_KIT, reason="needs CUDA, mamba_ssm and causal_conv1d")
def test_mamba_ssm_path_equals_stock_hflm(tmp_path):
    """A small random Mamba in bf16: per-sample log-likelihoods of the mamba_ssm path (masked prefill,
    CUDA-graph steps) against lm-eval's stock HFLM on the GPU, to bf16 noise."""
    from transformers import AutoTokenizer, MambaConfig, MambaForCausalLM

    from mamba_align.eval.leaderboard.lm import MambaAlignLM
    from mamba_align.model.tokenizer import CHAT_TEMPLATES
    from mamba_align.testing.demo import build_tiny_tokenizer

    rng = random.Random(0)
    build_tiny_tokenizer(tmp_path / "tok", [sentence(rng, 12) + "." for _ in range(300)], vocab_size=200)
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    tok.chat_template = CHAT_TEMPLATES["zephyr"]
    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(hidden_size=256, num_hidden_layers=4, vocab_size=len(tok),
                                         bos_token_id=0, eos_token_id=0, pad_token_id=1))
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    # unique contexts, and few-shot prefixes shared by several questions (one-token and multi-token choices)
    reqs = ll_instances(mc_pairs(seed=6, questions=8, choices=4) + fewshot_pairs(seed=7)
                        + fewshot_pairs(seed=8, long_choices=True))
    ours = MambaAlignLM(str(tmp_path / "model"), device="cuda", batch_size=16, dtype="bfloat16", backend="mamba_ssm")
    results = {"mamba_ssm": ours.loglikelihood(reqs)}
    del ours
    # the reference: lm-eval's stock HFLM on the same checkpoint and GPU (any transformers version; our
    # transformers scorer's cache API follows the locked transformers, not the GPU image's)
    from lm_eval.models.huggingface import HFLM

    results["stock"] = HFLM(pretrained=str(tmp_path / "model"), device="cuda", batch_size=16,
                            dtype="bfloat16").loglikelihood(reqs)
    for (a, _), (b, _) in zip(results["mamba_ssm"], results["stock"], strict=True):
        assert a == pytest.approx(b, rel=0.02, abs=0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU_KIT, reason="needs CUDA, mamba_ssm and causal_conv1d")
def test_mamba_ssm_generate_until_cuts_at_until_as_stock_hflm(tmp_path):
    """generate_until on the mamba_ssm engine (stop strings asked inside its decode loop) against lm-eval's
    stock HFLM, greedy in fp32: the same texts, free and cut at stop strings taken from the free ones."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer, MambaConfig, MambaForCausalLM

    from mamba_align.eval.leaderboard.lm import MambaAlignLM
    from mamba_align.testing.demo import build_tiny_tokenizer

    rng = random.Random(1)
    build_tiny_tokenizer(tmp_path / "model", [sentence(rng, 12) + "." for _ in range(300)], vocab_size=300)
    torch.manual_seed(1)
    vocab = len(AutoTokenizer.from_pretrained(tmp_path / "model"))
    MambaForCausalLM(MambaConfig(hidden_size=128, num_hidden_layers=2, vocab_size=vocab, bos_token_id=0,
                                 eos_token_id=0, pad_token_id=1)).save_pretrained(tmp_path / "model")
    ours = MambaAlignLM(str(tmp_path / "model"), device="cuda", batch_size=8, dtype="float32", backend="mamba_ssm")
    stock = HFLM(pretrained=str(tmp_path / "model"), device="cuda", batch_size=8, dtype="float32")
    generate_until_as_stock(ours, stock, [sentence(rng, n) for n in (3, 7, 12, 7, 5, 9)], 48, at=1 / 3)


def fewshot_pairs(seed=0, subjects=2, questions=5, long_choices=False, shots=6):
    """MMLU-shaped requests: per subject, the same few-shot prefix (lm-eval's `first_n` sampler) before
    each question, remainders of different lengths, one-token choices (or multi-word ones)."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(subjects):
        prefix = "".join(f"{sentence(rng, 12)}?\nAnswer: {rng.choice('ABCD')}\n\n" for _ in range(shots))
        for _ in range(questions):
            ctx = prefix + sentence(rng, rng.randint(2, 20)) + "?\nAnswer:"
            choices = [" " + sentence(rng, rng.randint(1, 4)) for _ in range(3)] if long_choices else \
                [" A", " B", " C", " D"]
            pairs += [(ctx, c) for c in choices]
    return pairs


def test_prefix_units_group_long_shared_openings_only():
    a, b = [1] * 80 + [2, 3], [1] * 80 + [4]
    c = [1] * 80  # the prefix itself is a context too
    short = [1] * 10 + [5] * 90  # 10 shared tokens: below min_prefix
    tail = [1] * 70 + [6] * 100  # 70 shared, under half of its 170 tokens
    units = S.prefix_units([a, b, c, short, tail], min_prefix=64)
    assert sorted((plen, sorted(m)) for plen, m in units) == [(80, [0, 1, 2]), (100, [3]), (170, [4])]


@pytest.mark.parametrize("long_choices", [False, True])
def test_shared_fewshot_prefix_read_once_and_scores_equal_stock_hflm(model_dir, stock, long_choices):
    """Questions after one few-shot prefix: the prefix is prefilled once per batch, the rest of each context
    stepped from its state (rows right-aligned, reset to the prefix state when they start); every
    log-likelihood equals the stock path's."""
    from mamba_align.eval.leaderboard.lm import MambaAlignLM

    lm = MambaAlignLM(str(model_dir), device="cpu", batch_size=16, dtype="float32")
    pairs = fewshot_pairs(long_choices=long_choices)
    reqs = ll_instances(pairs)
    got, want = lm.loglikelihood(reqs), stock.loglikelihood(reqs)
    for (a, ga), (b, gb) in zip(got, want, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-4) and ga == gb
    contexts = {ctx for ctx, _ in pairs}
    context_tokens = sum(len(lm.tok_encode(c)) for c in contexts)
    assert lm.scorer.stats["prefill_tokens"] < context_tokens / 2  # each subject's prefix read once per batch
    assert lm.scorer.stats["step_tokens"] > 0


@pytest.mark.parametrize("rows", [8, 4])
def test_ssm_scorer_shared_prefix_on_a_fake_runner(ours, rows):
    """The graph runner's side of prefix sharing (snapshot, reset of late-starting rows, expansion to one row
    per choice, idle slots) gives the transformers scorer's numbers."""
    # small: the fake runner re-reads each slot's whole history at every step
    pairs = fewshot_pairs(seed=3, subjects=1, questions=3, long_choices=True, shots=2) + \
        fewshot_pairs(seed=4, subjects=1, questions=3, shots=2)
    enc = [ours._encode_pair(c, x) for c, x in pairs]
    want = S.score(enc, S.HFScorer(ours.engine.model), max_rows=rows, min_prefix=10 ** 6)  # no sharing
    engine = FakeEngine(ours.engine.model)
    with torch.inference_mode():
        scorer = S.SSMScorer(engine, max_rows=rows)
        got = S.score(enc, scorer, max_rows=rows, min_prefix=16)
    assert scorer.stats["step_tokens"] > 0
    for (a, ga), (b, gb) in zip(got, want, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-4) and ga == gb

"""Log-likelihoods of continuations, reading each shared context once.

Multiple-choice tasks score several continuations after one long context (25-shot ARC, 10-shot HellaSwag,
5-shot MMLU). A Mamba's state after the context is fixed-size, so `score` prefills every distinct context
once (left-padded batches, padding masked out of the state), expands the state per choice, and advances all
choices of the batch one token at a time. Requests whose context is unique, or whose continuations are longer
than the context, are scored with one plain forward over context + continuation instead.

Two scorers hold the model side: `HFScorer` (transformers' MambaForCausalLM and its cache; CPU and the
portable path) and `SSMScorer` (mamba_ssm's model through the generation engine's CUDA-graph runner, whose
prefill is eval/engine/ssm.py `masked_mixer_prefill`). Both count the token positions they run (`stats`).
"""

from __future__ import annotations

from collections import Counter

from mamba_align.eval.engine.decode import _fit, _slot_sizes

Request = tuple[list[int], list[int]]  # (context tokens, continuation tokens)


def uses_state(context: list[int], continuations: list[list[int]]) -> bool:
    """Score from the cached state when the context is shared and at least as long as each continuation:
    then stepping through the continuations costs less than re-reading the context per choice."""
    return len(continuations) > 1 and max(len(c) for c in continuations) <= len(context)


def _batches(items: list, width, size, max_rows: int, max_tokens: int) -> list[list]:
    """Consecutive batches of `items` (sorted longest first) with at most `max_rows` rows (`size(item)` each)
    and at most `max_tokens` padded positions (rows of the batch's first item's `width`)."""
    out, cur, rows = [], [], 0
    for it in items:
        n = size(it)
        if cur and (rows + n > max_rows or (len(cur) + 1) * width(cur[0]) > max_tokens):
            out.append(cur)
            cur, rows = [], 0
        cur.append(it)
        rows += n
    if cur:
        out.append(cur)
    return out


def score(requests: list[Request], scorer, max_rows: int = 64, max_tokens: int = 16384,
          progress=None) -> list[tuple[float, bool]]:
    """(sum of log-probs, is greedy) of each request's continuation given its context, as lm-eval's HFLM
    computes them: log-softmax in float32 over the full vocabulary, greedy when every continuation token is
    the argmax at its position. `progress(n)`, if given, is called as n more requests are scored."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, cont) in enumerate(requests):
        if not ctx or not cont:
            raise ValueError(f"request {i}: empty context or continuation (lm-eval's TemplateLM adds a prefix token)")
        groups.setdefault(tuple(ctx), []).append(i)
    shared, single = [], []
    for ctx, idxs in groups.items():
        if uses_state(list(ctx), [requests[i][1] for i in idxs]):
            # a context with more choices than a batch has rows is prefilled once per chunk of choices
            shared += [(list(ctx), idxs[k : k + max_rows]) for k in range(0, len(idxs), max_rows)]
        else:
            single.extend(idxs)
    out: list[tuple[float, bool] | None] = [None] * len(requests)

    shared.sort(key=lambda g: -len(g[0]))
    for batch in _batches(shared, lambda g: len(g[0]), lambda g: len(g[1]), max_rows, max_tokens):
        contexts = [ctx for ctx, _ in batch]
        owner = [c for c, (_, idxs) in enumerate(batch) for _ in idxs]
        rows = [i for _, idxs in batch for i in idxs]
        results = _score_from_state(scorer, contexts, owner, [requests[i][1] for i in rows])
        for i, r in zip(rows, results, strict=True):
            out[i] = r
        if progress is not None:
            progress(len(rows))

    single.sort(key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    seq_len = lambda i: len(requests[i][0]) + len(requests[i][1]) - 1  # noqa: E731
    for batch in _batches(single, seq_len, lambda i: 1, max_rows, max_tokens):
        results = _score_full(scorer, [requests[i] for i in batch])
        for i, r in zip(batch, results, strict=True):
            out[i] = r
        if progress is not None:
            progress(len(batch))
    return out  # type: ignore[return-value]


def _score_from_state(scorer, contexts: list[list[int]], owner: list[int], conts: list[list[int]]):
    """Prefill `contexts` once; row r scores `conts[r]` from the state of context `owner[r]`."""
    import torch

    first = scorer.start(contexts, owner).float()  # (len(contexts), vocab): next-token logits after each context
    dev = first.device
    n, steps = len(conts), max(len(c) for c in conts)
    toks = torch.zeros(n, steps, dtype=torch.long)
    for r, c in enumerate(conts):
        toks[r, : len(c)] = torch.tensor(c, dtype=torch.long)
    toks = toks.to(dev)
    lens = torch.tensor([len(c) for c in conts], device=dev)
    logprob = torch.zeros(n, dtype=torch.float32, device=dev)
    greedy = torch.ones(n, dtype=torch.bool, device=dev)

    def add(logits, t):
        live = t < lens
        lp = torch.log_softmax(logits.float(), dim=-1)
        logprob.add_(torch.where(live, lp.gather(1, toks[:, t, None])[:, 0], 0.0))
        greedy.logical_and_(~live | (lp.argmax(dim=-1) == toks[:, t]))

    add(first[torch.tensor(owner, device=dev)], 0)
    for t in range(1, steps):
        add(scorer.step(toks[:, t - 1]), t)
    return list(zip(logprob.tolist(), greedy.tolist(), strict=True))


def _score_full(scorer, requests: list[Request]):
    """One forward over context + continuation[:-1] per request (right-padded batch)."""
    import torch

    seqs = [(ctx + cont)[:-1] for ctx, cont in requests]
    logits = scorer.forward(seqs)  # (batch, width, vocab)
    out = []
    for row, (ctx, cont) in zip(logits, requests, strict=True):
        pos = len(ctx) - 1
        lp = torch.log_softmax(row[pos : pos + len(cont)].float(), dim=-1)
        target = torch.tensor(cont, dtype=torch.long, device=lp.device)
        out.append((float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(dim=-1) == target).all())))
    return out


def _left_padded(seqs: list[list[int]]):
    """(ids, mask) of a left-padded batch; mask is None when no row is padded."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for j, s in enumerate(seqs):
        ids[j, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[j, width - len(s):] = 1
    return ids, (None if all(len(s) == width for s in seqs) else mask)


def _right_padded(seqs: list[list[int]]):
    import torch

    ids = torch.zeros(len(seqs), max(len(s) for s in seqs), dtype=torch.long)
    for j, s in enumerate(seqs):
        ids[j, : len(s)] = torch.tensor(s, dtype=torch.long)
    return ids


class HFScorer:
    """transformers' MambaForCausalLM: a prefill with use_cache (the attention mask zeroes padding out of
    the conv and scan inputs, so a padded row's state is its unpadded one), the cache reordered to one row
    per choice, then single-token steps against the cache."""

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device
        self.stats: Counter = Counter()
        self.cache = None

    def start(self, contexts: list[list[int]], owner: list[int]):
        import torch

        ids, mask = _left_padded(contexts)
        self.stats["prefill_tokens"] += sum(len(c) for c in contexts)
        self.stats["positions"] += ids.numel()
        with torch.inference_mode():
            out = self.model(input_ids=ids.to(self.device), use_cache=True, logits_to_keep=1,
                             attention_mask=None if mask is None else mask.to(self.device))
        self.cache = out.cache
        self.cache.reorder_cache(torch.tensor(owner, device=self.device))
        return out.logits[:, -1]

    def step(self, tokens):
        import torch

        self.stats["step_tokens"] += len(tokens)
        self.stats["positions"] += len(tokens)
        with torch.inference_mode():
            out = self.model(input_ids=tokens[:, None], cache=self.cache, use_cache=True)
        self.cache = out.cache
        return out.logits[:, -1]

    def forward(self, seqs: list[list[int]]):
        import torch

        ids = _right_padded(seqs)  # causal: right padding changes no earlier position
        self.stats["full_tokens"] += sum(len(s) for s in seqs)
        self.stats["positions"] += ids.numel()
        with torch.inference_mode():
            return self.model(input_ids=ids.to(self.device), use_cache=False).logits


class SSMScorer:
    """mamba_ssm's model in the generation engine (eval/engine/ssm.py): the masked left-padded prefill and
    the CUDA-graph decode step of `_GraphRunner`, with slot counts from the decode loop's few sizes (one
    captured graph per size)."""

    def __init__(self, engine, max_rows: int):
        self.engine = engine
        self.device = engine.device
        self.sizes = _slot_sizes(max_rows)
        self.stats: Counter = Counter()
        self.runner = None
        self.rows = 0

    def start(self, contexts: list[list[int]], owner: list[int]):
        import torch

        if len(owner) > self.sizes[-1]:
            raise ValueError(f"{len(owner)} rows exceed the {self.sizes[-1]} decode slots")
        first = [owner.index(c) for c in range(len(contexts))]  # each context is prefilled into its first row
        self.stats["prefill_tokens"] += sum(len(c) for c in contexts)
        self.stats["positions"] += len(contexts) * max(len(c) for c in contexts)
        with torch.inference_mode():  # the graph is captured (on first use) and replayed in inference mode
            self.runner = self.engine._runner(_fit(len(owner), self.sizes))
            self.rows = len(owner)
            logits = self.runner.prefill(first, contexts)
            self.runner.copy_slots_from(self.runner, [first[c] for c in owner], list(range(len(owner))))
        return logits

    def step(self, tokens):
        import torch

        self.stats["step_tokens"] += self.runner.slots
        self.stats["positions"] += self.runner.slots
        padded = torch.zeros(self.runner.slots, dtype=torch.long, device=self.device)
        padded[: self.rows] = tokens
        with torch.inference_mode():
            # consumed before the next step, which reuses the graph's output buffer
            return self.runner.step(padded)[: self.rows]

    def forward(self, seqs: list[list[int]]):
        import torch

        ids = _right_padded(seqs).to(self.device)
        self.stats["full_tokens"] += sum(len(s) for s in seqs)
        self.stats["positions"] += ids.numel()
        with torch.inference_mode():
            return self.engine.model(ids).logits

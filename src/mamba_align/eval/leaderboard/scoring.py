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
from mamba_align.eval.engine.ssm import left_padded, prefill_width

Request = tuple[list[int], list[int]]  # (context tokens, continuation tokens)


def uses_state(context: list[int], continuations: list[list[int]]) -> bool:
    """Score from the cached state when the context is shared and at least as long as each continuation:
    then stepping through the continuations costs less than re-reading the context per choice."""
    return len(continuations) > 1 and max(len(c) for c in continuations) <= len(context)


def _scan_chunks(width: int) -> int:
    """mamba_ssm's selective scan reads a row in chunks of 2,048 positions once it is longer than 1,024 (up to
    1,024, one chunk of the row's size): a row of 1,088 costs as much as one of 2,048 (benchmarks §15)."""
    return 0 if width <= 1024 else -(-width // 2048)


def _batches(items: list, width, size, max_rows: int, max_tokens: int) -> list[list]:
    """Consecutive batches of `items` (sorted longest first) with at most `max_rows` rows (`size(item)` each)
    and at most `max_tokens` padded positions (rows of the batch's first item's `width`). A batch ends where
    the widths cross a scan chunk (`_scan_chunks`): rows of 1,000 are not padded to 1,100 and scanned as 2,048."""
    out, cur, rows = [], [], 0
    for it in items:
        n = size(it)
        if cur and (rows + n > max_rows or (len(cur) + 1) * width(cur[0]) > max_tokens
                    or _scan_chunks(width(it)) != _scan_chunks(width(cur[0]))):
            out.append(cur)
            cur, rows = [], 0
        cur.append(it)
        rows += n
    if cur:
        out.append(cur)
    return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((k for k in range(n) if a[k] != b[k]), n)


def prefix_units(contexts: list[list[int]], min_prefix: int = 64) -> list[tuple[int, list[int]]]:
    """Group contexts (distinct token lists) that open with the same long prefix: [(prefix length, indices)].

    MMLU's few-shot examples are the first five of the subject's dev split (lm-eval's `first_n` sampler), so
    every question of a subject repeats the same ~600-token prefix. Contexts join a group while the group's
    common prefix stays at least `min_prefix` tokens and at least half of each member's length (a short
    accidental overlap, e.g. two random few-shot draws opening with the same example, is not worth stepping
    the rest token by token). A context without such neighbours is a group of one (prefix = the context)."""
    order = sorted(range(len(contexts)), key=lambda i: contexts[i])  # shared prefixes become neighbours
    units: list[tuple[int, list[int]]] = []
    longest = 0  # of the last unit's members
    for i in order:
        if units:
            plen, members = units[-1]
            common = min(plen, _common_prefix(contexts[members[-1]], contexts[i]))
            if common >= min_prefix and 2 * common >= max(longest, len(contexts[i])):
                units[-1] = (common, members + [i])
                longest = max(longest, len(contexts[i]))
                continue
        units.append((len(contexts[i]), [i]))
        longest = len(contexts[i])
    return units


def _score_contexts(requests: list[Request], shared: list[tuple[list[int], list[int]]], scorer, max_rows: int,
                    max_tokens: int, min_prefix: int, progress) -> dict[int, tuple[float, bool]]:
    """Score the requests of `shared` [(context, request indices)] from each context's state."""
    contexts = [ctx for ctx, _ in shared]
    steps = lambda j: any(len(requests[i][1]) > 1 for i in shared[j][1])  # noqa: E731
    rows = lambda j: len(shared[j][1]) if steps(j) else 1  # noqa: E731  (one-token choices share one row)
    chunks = []  # (prefix length, context indices): one prefill of the prefix, the rest stepped per row
    for plen, members in prefix_units(contexts, min_prefix):
        members.sort(key=lambda j: -len(contexts[j]))  # similar remainders step together
        cur, n = [], 0
        for j in members:
            if cur and n + rows(j) > max_rows:
                chunks.append((plen, cur))
                cur, n = [], 0
            cur.append(j)
            n += rows(j)
        chunks.append((plen, cur))
    chunks.sort(key=lambda c: -c[0])
    out = {}
    for batch in _batches(chunks, lambda c: c[0], lambda c: sum(rows(j) for j in c[1]), max_rows, max_tokens):
        ctx_ids = [j for _, members in batch for j in members]
        prefix_of = [k for k, (_, members) in enumerate(batch) for _ in members]
        prefixes = [contexts[members[0]][:plen] for plen, members in batch]
        remainders = [contexts[j][len(prefixes[k]):] for j, k in zip(ctx_ids, prefix_of, strict=True)]
        req_ids = [shared[j][1] for j in ctx_ids]
        results = _score_from_state(scorer, prefixes, prefix_of, remainders,
                                    [[requests[i][1] for i in ids] for ids in req_ids])
        for ids, res in zip(req_ids, results, strict=True):
            out.update(zip(ids, res, strict=True))
        if progress is not None:
            progress(sum(len(ids) for ids in req_ids))
    return out


def score(requests: list[Request], scorer, max_rows: int = 64, max_tokens: int = 16384, min_prefix: int = 64,
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
    for i, r in _score_contexts(requests, shared, scorer, max_rows, max_tokens, min_prefix, progress).items():
        out[i] = r

    single.sort(key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    seq_len = lambda i: len(requests[i][0]) + len(requests[i][1]) - 1  # noqa: E731
    for batch in _batches(single, seq_len, lambda i: 1, max_rows, max_tokens):
        results = _score_full(scorer, [requests[i] for i in batch])
        for i, r in zip(batch, results, strict=True):
            out[i] = r
        if progress is not None:
            progress(len(batch))
    return out  # type: ignore[return-value]


def _score_from_state(scorer, prefixes: list[list[int]], prefix_of: list[int], remainders: list[list[int]],
                      conts: list[list[list[int]]]) -> list[list[tuple[float, bool]]]:
    """Context c is prefixes[prefix_of[c]] + remainders[c]; score each of its continuations conts[c].

    Each prefix is prefilled once and its state given to its contexts' rows; the remainders are stepped
    one token per row, right-aligned so that every row ends its context at the last step (a row whose
    remainder is shorter starts later: its state is reset to its prefix's when it starts). Then, unless
    every continuation is one token (read from the context's last logits), each row is copied to one row
    per continuation and all continuations are stepped together."""
    import torch

    multi = any(len(c) > 1 for cs in conts for c in cs)
    owner = [c for c, cs in enumerate(conts) for _ in cs]
    first = scorer.start(prefixes, prefix_of, rows=max(len(prefix_of), len(owner) if multi else 0)).float()
    dev = first.device
    first = first[torch.tensor(prefix_of, device=dev)]  # (contexts, vocab)
    longest = max(len(r) for r in remainders)
    if longest:
        saved = scorer.snapshot([prefix_of.index(k) for k in range(len(prefixes))])
        begin: dict[int, list[int]] = {}
        for c, r in enumerate(remainders):
            begin.setdefault(longest - len(r), []).append(c)
        toks = left_padded(remainders)[0].to(dev)  # right-aligned: every row ends its context at the last step
        logits = None
        for t in range(longest + 1):
            if t and t in begin:  # rows starting now (at longest: empty remainders) take their prefix's state
                scorer.restore(saved, [prefix_of[c] for c in begin[t]], begin[t])
            if t < longest:
                logits = scorer.step(toks[:, t])
        has_rest = torch.tensor([bool(r) for r in remainders], device=dev)
        first = torch.where(has_rest[:, None], logits.float(), first)
    if not multi:
        lp = torch.log_softmax(first, dim=-1)
        best = lp.argmax(dim=-1).tolist()
        return [[(float(lp[c, x[0]]), best[c] == x[0]) for x in cs] for c, cs in enumerate(conts)]
    scorer.expand(owner)
    flat = [x for cs in conts for x in cs]
    n, steps = len(flat), max(len(x) for x in flat)
    tokens = _right_padded(flat).to(dev)
    lens = torch.tensor([len(x) for x in flat], device=dev)
    logprob = torch.zeros(n, dtype=torch.float32, device=dev)
    greedy = torch.ones(n, dtype=torch.bool, device=dev)

    def add(logits, t):
        live = t < lens
        lp = torch.log_softmax(logits.float(), dim=-1)
        logprob.add_(torch.where(live, lp.gather(1, tokens[:, t, None])[:, 0], 0.0))
        greedy.logical_and_(~live | (lp.argmax(dim=-1) == tokens[:, t]))

    add(first[torch.tensor(owner, device=dev)], 0)
    for t in range(1, steps):
        add(scorer.step(tokens[:, t - 1]), t)
    flat_out = list(zip(logprob.tolist(), greedy.tolist(), strict=True))
    out, k = [], 0
    for cs in conts:
        out.append(flat_out[k : k + len(cs)])
        k += len(cs)
    return out


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

    def start(self, contexts: list[list[int]], owner: list[int], rows: int = 0):
        """Prefill `contexts`; row r of the cache then holds context owner[r]'s state. Returns each context's
        next-token logits. (`rows`: the most rows a later `expand` asks for; the cache grows as needed.)"""
        import torch

        ids, mask = left_padded(contexts)
        self.stats["prefill_tokens"] += sum(len(c) for c in contexts)
        self.stats["positions"] += ids.numel()
        with torch.inference_mode():
            out = self.model(input_ids=ids.to(self.device), use_cache=True, logits_to_keep=1,
                             attention_mask=None if mask is None else mask.long().to(self.device))
        self.cache = out.cache
        self.expand(owner)
        return out.logits[:, -1]

    def expand(self, owner: list[int]) -> None:
        """Row r becomes a copy of the current row owner[r]."""
        import torch

        self.cache.reorder_cache(torch.tensor(owner, device=self.device))

    def snapshot(self, rows: list[int]):
        return [(layer.conv_states[0][rows].clone(), layer.recurrent_states[0][rows].clone())
                for layer in self.cache.layers]

    def restore(self, saved, src: list[int], dst: list[int]) -> None:
        """Rows `dst` take the states of the snapshot's rows `src`."""
        for layer, (conv, ssm) in zip(self.cache.layers, saved, strict=True):
            layer.conv_states[0][dst] = conv[src]
            layer.recurrent_states[0][dst] = ssm[src]

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

    def start(self, contexts: list[list[int]], owner: list[int], rows: int = 0):
        """As HFScorer.start, on a runner of at least max(len(owner), rows) slots."""
        import torch

        if max(len(owner), rows) > self.sizes[-1]:
            raise ValueError(f"{max(len(owner), rows)} rows exceed the {self.sizes[-1]} decode slots")
        first = [owner.index(c) for c in range(len(contexts))]  # each context is prefilled into its first row
        self.stats["prefill_tokens"] += sum(len(c) for c in contexts)
        self.stats["positions"] += len(contexts) * prefill_width(contexts)
        with torch.inference_mode():  # the graph is captured (on first use) and replayed in inference mode
            self.runner = self.engine._runner(_fit(max(len(owner), rows), self.sizes))
            logits = self.runner.prefill(first, contexts)
            self.expand([first[c] for c in owner])
        return logits

    def expand(self, owner: list[int]) -> None:
        import torch

        with torch.inference_mode():
            self.runner.copy_slots_from(self.runner, owner, list(range(len(owner))))
        self.rows = len(owner)

    def snapshot(self, rows: list[int]):
        import torch

        with torch.inference_mode():
            return self.runner.snapshot(rows)

    def restore(self, saved, src: list[int], dst: list[int]) -> None:
        import torch

        with torch.inference_mode():
            self.runner.copy_slots_from(saved, src, dst)

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

"""The continuous-batching decode loop, independent of the model: a fixed number of slots is kept busy,
and a finished sequence's slot is refilled with the next prompt at once (a Mamba sequence's whole
context is a fixed-size state, so slots are interchangeable). The model side is a "runner" (see
`decode_loop`); eval/engine/ssm.py provides the CUDA-graph one, tests a toy one on CPU."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from mamba_align.eval.engine.sampling import Sampling, cut_at_eos, sample_next, stop_ids


def _slot_sizes(batch_size: int) -> list[int]:
    """Slot counts a decoder may be built for: powers of two up to `batch_size`, and `batch_size` itself.
    Few sizes, so CUDA graphs are reused across calls."""
    sizes = {batch_size}
    s = 1
    while s < batch_size:
        sizes.add(s)
        s *= 2
    return sorted(sizes)


def _fit(n: int, sizes: list[int]) -> int:
    return next((s for s in sizes if s >= n), sizes[-1])


def decode_loop(prompts: list[list[int]], sampling: Sampling, eos_token_id, get_runner: Callable,
                batch_size: int, sync_every: int = 16, prefill_tokens: int = 16384,
                on_finished: Callable[[int], None] | None = None,
                stop: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
    """Generate for every prompt with a fixed set of decode slots, refilling a slot as soon as its sequence ends.

    `get_runner(slots)` returns an object with `.slots`, `.device`, `.prefill(slot_ids, prompts) -> logits`
    (writes those slots' states, returns each prompt's next-token logits), `.step(tokens) -> logits` (one
    decode step for all slots) and `.copy_slots_from(other, src, dst)`. The host looks at the GPU only
    every `sync_every` steps; a sequence that ended meanwhile generates a few discarded tokens.
    `stop(tokens)`, if given, is asked at those looks whether a sequence's tokens so far end it (a stop string
    in their text): it returns them as they are then, up to `sync_every` - 1 tokens past the stop.
    When the queue is empty and few sequences remain, they move to a smaller runner."""
    import torch

    n = len(prompts)
    results: list[list[int] | None] = [None] * n
    max_new = sampling.max_new_tokens
    if max_new <= 0 or n == 0:
        return [[] for _ in prompts]
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: the engine needs at least one prompt token")

    sizes = _slot_sizes(batch_size)
    runner = get_runner(_fit(n, sizes))
    dev = runner.device
    stops = torch.tensor(stop_ids(eos_token_id), dtype=torch.long, device=dev)  # eos: None, one id or several
    # Longest first: prompts prefilled together then have similar lengths (little padding).
    queue = deque(sorted(range(n), key=lambda i: -len(prompts[i])))

    def new_buffers(slots: int):
        return (torch.zeros(slots, max_new, dtype=torch.long, device=dev),  # generated tokens
                torch.zeros(slots, dtype=torch.long, device=dev),  # last token
                torch.zeros(slots, dtype=torch.long, device=dev),  # tokens generated so far
                torch.ones(slots, dtype=torch.bool, device=dev))  # finished (idle slots count as finished)

    out_buf, last, pos, done = new_buffers(runner.slots)
    owner = [-1] * runner.slots  # prompt index in each slot, -1 = idle
    count = [0] * runner.slots  # host copy of pos for live slots
    arange = torch.arange(runner.slots, device=dev)

    def fill(free: list[int]) -> None:
        take = []
        while free and queue:
            take.append((free.pop(0), queue.popleft()))
        start = 0
        while start < len(take):
            # group so that the padded prefill stays under prefill_tokens (lengths are sorted descending)
            width = len(prompts[take[start][1]])
            end = start + max(1, min(len(take) - start, prefill_tokens // max(width, 1)))
            group = take[start:end]
            start = end
            slots = [s for s, _ in group]
            logits = runner.prefill(slots, [prompts[i] for _, i in group])
            tok = sample_next(logits, sampling)
            idx = torch.tensor(slots, device=dev)
            out_buf[idx, 0] = tok
            last[idx] = tok
            pos[idx] = 1
            done[idx] = torch.isin(tok, stops)
            for s, i in group:
                owner[s] = i
                count[s] = 1

    fill(list(range(runner.slots)))
    while True:
        live = [s for s in range(runner.slots) if owner[s] >= 0]
        finished_host = done.tolist()
        ended = [s for s in live if finished_host[s] or count[s] >= max_new]
        if stop is not None and len(ended) < len(live):
            going = [s for s in live if s not in ended]
            rows = out_buf[torch.tensor(going, device=dev), : max(count[s] for s in going)].tolist()
            ended += [s for s, row in zip(going, rows, strict=True) if stop(row[: count[s]])]
        for s in ended:
            row = out_buf[s, : count[s]].tolist()
            results[owner[s]] = cut_at_eos(row, eos_token_id)
            owner[s] = -1
            done[s] = True
        if ended and on_finished is not None:
            on_finished(len(ended))
        if ended and queue:
            fill(ended)
        live = [s for s in range(runner.slots) if owner[s] >= 0]
        if not live:
            break
        if not queue and runner.slots > 1 and len(live) * 4 <= runner.slots:
            # few sequences left: continue them on a smaller runner (fewer idle slots per step)
            smaller = get_runner(_fit(len(live), sizes))
            if smaller.slots < runner.slots:
                src = torch.tensor(live, device=dev)
                dst_slots = list(range(len(live)))
                smaller.copy_slots_from(runner, live, dst_slots)
                b_out, b_last, b_pos, b_done = new_buffers(smaller.slots)
                dst = torch.tensor(dst_slots, device=dev)
                b_out[dst], b_last[dst], b_pos[dst], b_done[dst] = out_buf[src], last[src], pos[src], done[src]
                out_buf, last, pos, done = b_out, b_last, b_pos, b_done
                owner = [owner[s] for s in live] + [-1] * (smaller.slots - len(live))
                count = [count[s] for s in live] + [0] * (smaller.slots - len(live))
                runner = smaller
                arange = torch.arange(runner.slots, device=dev)
                live = dst_slots
        steps = min(sync_every, min(max_new - count[s] for s in live))
        for _ in range(steps):
            logits = runner.step(last)
            tok = sample_next(logits, sampling)
            out_buf[arange, pos.clamp(max=max_new - 1)] = tok
            pos += 1
            if len(stops):
                done |= torch.isin(tok, stops)
            last = tok
        for s in live:
            count[s] += steps
    return results  # type: ignore[return-value]

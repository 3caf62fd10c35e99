"""How a recipe's global batch is split over N processes: per-device batch x accumulation x N, the same rows per
optimizer step whatever N is (a run resumes on another GPU count: mamba_align.ops.jobenv.gpu_choice)."""

from __future__ import annotations

from mamba_align.utils import UserError


def nearest_valid(n: int, global_batch: int) -> list[int]:
    """The counts nearest to n, below and above, that divide the global batch."""
    below = max(d for d in range(1, n + 1) if global_batch % d == 0)
    above = [d for d in range(n, global_batch + 1) if global_batch % d == 0]
    return sorted({below, *above[:1]})


def batch_layout(global_batch: int, per_device: int, n: int) -> tuple[int, int]:
    """(per-device batch, accumulation steps) for n processes: the recipe's per-device batch where it divides
    the rows each process takes per step, else the largest one below it that does (never more memory)."""
    if global_batch % n:
        raise UserError(f"{n} processes cannot keep global_batch_size {global_batch} (not a divisor); nearest "
                        f"valid counts: {', '.join(map(str, nearest_valid(n, global_batch)))}")
    rows = global_batch // n
    device = max(d for d in range(1, min(per_device, rows) + 1) if rows % d == 0)
    return device, rows // device

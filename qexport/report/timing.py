"""Latency measurement: warm-up, N timed runs, robust summary statistics.

A measured call is "numpy in -> numpy out" for every runtime (the backends' ``Runner.run``
contract), so host<->device copies are inside the timing on GPU for all rows alike.
Each timed run is bracketed by ``synchronize()`` and ``time.perf_counter``; on GPU that
waits for all queued device work, which CUDA events would also need to do before the
result could be read on the host.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from qexport.backends.base import Runner


def default_warmup(iters: int) -> int:
    """Warm-up runs for ``iters`` timed runs: 20 %, at least 2, at most 10."""
    return max(2, min(10, iters // 5))


#: Timed runs a point keeps even when it exceeds its time budget.
MIN_TIMED = 3


def time_runs(
    runner: Runner, feeds: Mapping[str, np.ndarray], iters: int, warmup: int, budget_s: float | None = None
) -> list[float]:
    """Seconds per run for ``iters`` runs after ``warmup`` untimed runs.

    ``budget_s`` caps a slow point: warm-up stops (after at least one run) once it has taken
    a quarter of the budget, and timing stops once it has taken the budget and has
    :data:`MIN_TIMED` samples; the caller sees how many samples it got.
    """
    clock: Callable[[], float] = time.perf_counter
    t_start = clock()
    for _ in range(warmup):
        runner.run(feeds)
        if budget_s is not None and clock() - t_start > budget_s / 4:
            break
    runner.synchronize()
    samples: list[float] = []
    t_start = clock()
    for _ in range(iters):
        t0 = clock()
        runner.run(feeds)
        runner.synchronize()
        samples.append(clock() - t0)
        if budget_s is not None and len(samples) >= MIN_TIMED and clock() - t_start > budget_s:
            break
    return samples


def interleaved_ms(
    calls: Mapping[str, Callable[[], object]], iters: int, block: int = 3, settle: float = 0.25
) -> dict[str, float]:
    """Median milliseconds per call of each contender, timed in turns within one process.

    Each round gives every contender a turn: a pause of ``settle`` seconds, one untimed call,
    then ``block`` timed calls, so that a drift of the machine (another process, the clock)
    affects all contenders alike and the ratios come from one run. The pause lets the previous
    contender's thread pool go to sleep: ONNX Runtime's workers spin for 10-50 ms after a call
    (a 2-thread TVM GEMM timed within 10 ms of an ORT call ran at half its speed on 2 cores, 12.4
    vs 6.4 ms; 6.6 ms after a 50 ms pause) and OpenMP pools (numpy's BLAS) up to 200 ms (small
    GEMMs needed the 250 ms default to reach their alone speed), so each contender is timed as if
    it were alone, as in a user's process. The untimed call wakes the contender's own pool (ORT's
    first call after a pause was 2x slower). Rounds: ``ceil(iters / block)``.
    """
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(-(-iters // block)):
        for name, call in calls.items():
            if settle > 0:
                time.sleep(settle)
            call()
            for _ in range(block):
                t0 = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(v) * 1000) for name, v in times.items()}


def summarize(samples: Sequence[float], batch: int) -> dict[str, float]:
    """Median / p10 / p90 / mean / min in milliseconds and sequences per second (at the median)."""
    if not samples:
        raise ValueError("no timing samples")
    ms = np.asarray(samples, dtype=np.float64) * 1e3
    median = float(np.median(ms))
    return {
        "median_ms": median,
        "p10_ms": float(np.percentile(ms, 10)),
        "p90_ms": float(np.percentile(ms, 90)),
        "mean_ms": float(ms.mean()),
        "min_ms": float(ms.min()),
        "seq_per_s": batch / (median / 1e3) if median > 0 else float("inf"),
    }


def random_feeds(batch: int, seq: int, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """int64 ``input_ids`` (away from the special ids at the bottom of the vocab) and an all-ones mask."""
    rng = np.random.default_rng(seed)
    low = min(1000, vocab_size // 2)
    ids = rng.integers(low, vocab_size, size=(batch, seq), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones((batch, seq), dtype=np.int64)}


_OOM_MARKERS = (
    "out of memory",
    "failed to allocate",
    "bad_alloc",
    "cudaerrormemoryallocation",
    "cuda_error_out_of_memory",
    "cannot allocate memory",
    "std::bad_alloc",
)


def is_oom(exc: BaseException) -> bool:
    """True for the ways runtimes report exhausted host or device memory."""
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:
        pass
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(m in text for m in _OOM_MARKERS)


def short_reason(exc: BaseException, limit: int = 300) -> str:
    """One line for a report row: the exception's first line, clipped."""
    from qexport.errors import QexportError

    msg = exc.message if isinstance(exc, QexportError) else str(exc)
    first = next((ln.strip() for ln in msg.splitlines() if ln.strip()), "")
    text = first if isinstance(exc, QexportError) else f"{type(exc).__name__}: {first}"
    return text if len(text) <= limit else text[: limit - 3] + "..."

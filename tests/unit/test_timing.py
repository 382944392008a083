"""The benchmark harness's turns (qexport.report.timing.interleaved_ms): who runs when, what is timed."""

from __future__ import annotations

import time

from qexport.report.timing import interleaved_ms


def test_turns_pause_warm_and_time_each_contender_alone() -> None:
    log: list[tuple[str, float]] = []

    def contender(name: str, seconds: float):  # type: ignore[no-untyped-def]
        def call() -> None:
            log.append((name, time.perf_counter()))
            time.sleep(seconds)

        return call

    calls = {"fast": contender("fast", 0.001), "slow": contender("slow", 0.004)}
    ms = interleaved_ms(calls, iters=4, block=2, settle=0.03)
    # ceil(4 / 2) = 2 rounds; each turn: one untimed call + 2 timed ones, contenders in turn
    assert [n for n, _ in log] == ["fast"] * 3 + ["slow"] * 3 + ["fast"] * 3 + ["slow"] * 3
    # the pause comes before each turn, not between a contender's own calls
    starts = [t for _, t in log]
    assert starts[3] - starts[2] >= 0.03 and starts[6] - starts[5] >= 0.03
    assert starts[2] - starts[1] < 0.03
    # only the timed calls count: medians near the sleeps, never including the pause
    assert 1.0 <= ms["fast"] < 0.03 * 1000 and 4.0 <= ms["slow"] < 0.03 * 1000
    assert ms["slow"] > ms["fast"]

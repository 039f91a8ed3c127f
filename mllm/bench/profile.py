"""Why a candidate is slower than its baseline: torch.profiler's self CPU time per operator, compared.

    reason = extra_time(baseline_fn, candidate_fn)
    # "profiler, per call: 41 ms more in all; aten::mm +18 ms, aten::masked_scatter +6 ms, ..."
"""

from __future__ import annotations

from collections.abc import Callable

from torch.profiler import ProfilerActivity, profile


def self_times(fn: Callable[[], object]) -> dict[str, float]:
    """Self CPU seconds of each operator in one call of `fn` (after the caller's warm-up)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}


def top_ops(fn: Callable[[], object], n: int = 4) -> str:
    """Where one call spends its time: the `n` operators with the most self CPU time, with their shares."""
    times = self_times(fn)
    total = sum(times.values()) or 1.0
    top = sorted(times.items(), key=lambda kv: -kv[1])[:n]
    return "profiler: " + ", ".join(f"{k} {t * 1e3:.1f} ms ({t / total:.0%})" for k, t in top)


def extra_time(baseline: Callable[[], object], candidate: Callable[[], object], n: int = 4) -> str:
    """The operators in which `candidate` spends the most self CPU time beyond `baseline`, per call."""
    base, cand = self_times(baseline), self_times(candidate)
    extra = {k: t - base.get(k, 0.0) for k, t in cand.items()}
    top = sorted(extra.items(), key=lambda kv: -kv[1])[:n]
    total = sum(cand.values()) - sum(base.values())
    return (f"profiler, per call: {total * 1e3:+.1f} ms in all; "
            + ", ".join(f"{k} {t * 1e3:+.1f} ms" for k, t in top))

"""A step's peak memory on CPU, measured: what the planner's activation and transient terms are checked against."""

from __future__ import annotations


def step_peak(step) -> int:
    """Peak bytes allocated during ``step`` above what existed before, from the profiler's memory timeline.

    torch.cuda.max_memory_allocated has no CPU counterpart; the profiler records every CPU allocation
    and free with its size, which gives the same number for a CPU step.
    """
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
        step()
    current = peak = 0
    for _, action, _, size in MemoryProfile(prof.profiler.kineto_results).timeline:
        current += size if action.name == "CREATE" else -size if action.name == "DESTROY" else 0
        peak = max(peak, current)
    return peak

"""Measuring the peak memory of a function: CUDA's allocator statistics, or the CPU profiler's allocations."""

from __future__ import annotations

__all__ = ["peak_memory"]


def peak_memory(fn, device=None) -> int:
    """Peak bytes torch allocates while `fn()` runs, above what was allocated when it started.

    CUDA: torch.cuda.max_memory_allocated (torch's caching allocator; the CUDA context and paged
    optimizer states are not in it; cuBLAS's per-thread workspaces are allocated before it starts).
    CPU: every allocation and free the profiler records (profile_memory=True), replayed in time order.
    """
    import os

    import torch

    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda":
        # cuBLAS takes its workspace (32 MiB per thread on an H100) from torch's pool the first time a
        # thread multiplies matrices, and keeps it: the forward runs in this thread, the backward in
        # autograd's device thread. Warm both first so the peak is fn's own (on a tiny model the backward
        # thread's workspace alone was +33 MB, a third of the ledger).
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.ones(16, 16, device=device, dtype=dtype, requires_grad=True)
            torch.nn.functional.linear(x, x, x[0]).sum().backward()
        del x
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    if device.type != "cpu":
        raise ValueError(f"device must be a CPU or CUDA device, got {device}")
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    saved_stderr = os.dup(2)  # the profiler's C++ side prints start/stop lines with timestamps there
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                fn()
    finally:
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation:  # alloc_size < 0 for a free
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
        stack.extend(event.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


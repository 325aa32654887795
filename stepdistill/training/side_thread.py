"""A second CPU thread for a step's no-grad passes, overlapped with the student's forward and backward.

On a CPU, one small-batch UNet pass does not keep two cores busy (intra-op threads scale poorly at testbed
sizes), but two independent passes on one core each do. The frozen teacher's passes do not depend on the
student's weights, so the next step's teacher pass can run during this step's backward; torch operators
release the GIL, so the two threads really run in parallel. Jobs keep the calling thread's autocast state
(it is thread-local) and run without autograd.
"""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any, Callable

import torch

_AUTOCAST_DEVICES = ("cpu", "cuda")


def cores_per_process() -> int:
    """CPU cores this process may use: its affinity set shared among the node's local processes. (Not torch's
    thread count: ``accelerate launch`` sets OMP_NUM_THREADS=1 on CPU machines by default.)"""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def thread_budget(num_threads: int = 0) -> int:
    """Torch CPU threads for a training process: ``num_threads`` when set; otherwise, on CPU-only machines,
    every core this process may use, because ``accelerate launch`` leaves a CPU process with one thread
    unless given ``--num_cpu_threads_per_process``; on GPU machines torch's current count."""
    if num_threads:
        return num_threads
    return torch.get_num_threads() if torch.cuda.is_available() else cores_per_process()


def side_thread_wanted(option: bool | None, num_threads: int | None = None) -> bool:
    """The option, or by default: on for CPU-only runs with at least two cores (``num_threads``, when given,
    is the thread budget instead)."""
    if option is not None:
        return option
    return not torch.cuda.is_available() and thread_budget(num_threads or 0) >= 2


class SideThread:
    """One worker thread; :meth:`submit` returns a Future whose job ran under the caller's autocast and no_grad."""

    def __init__(self, num_threads: int | None = None) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stepdistill-side")
        self._budget = num_threads  # threads for both together; None: every core this process may use
        self._threads_before: int | None = None  # the main thread's count before the split, restored by close()

    def split_cores(self) -> None:
        """Give each of the two threads half of the thread budget (once), so together they use every core
        without oversubscribing them."""
        if self._threads_before is None:
            self._threads_before = torch.get_num_threads()
            total = thread_budget(self._budget or 0)
            torch.set_num_threads(max(1, total // 2))
            self._pool.submit(torch.set_num_threads, max(1, total - total // 2)).result()

    def submit(self, fn: Callable[..., torch.Tensor], *args: Any) -> Future:
        self.split_cores()
        states = [(d, torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES if torch.is_autocast_enabled(d)]

        def job() -> Any:
            with ExitStack() as stack:
                stack.enter_context(torch.no_grad())
                for device, dtype in states:
                    stack.enter_context(torch.autocast(device, dtype=dtype))
                return fn(*args)

        return self._pool.submit(job)

    def close(self) -> None:
        """Finish queued jobs, stop the thread and give the main thread its cores back."""
        self._pool.shutdown(wait=True)
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)

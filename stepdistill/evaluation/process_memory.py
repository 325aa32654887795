"""Peak memory of a whole process tree, for benchmarks that compare scripts with and without worker processes.

A process's max RSS misses its data-loader workers, and summing the RSS of forked processes counts the pages
they share with their parent twice. The proportional set size (PSS: each shared page split among the
processes mapping it) summed over the tree is what the run costs the machine. Linux only (``/proc``).
On a GPU machine the same sampler can add up the GPU memory nvidia-smi reports for the tree's processes, which
counts a launched script's CUDA memory from outside it (its CUDA context included).
"""
from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """``pid``'s children, grandchildren, ... (from /proc/<pid>/task/<tid>/children)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                kids = [int(k) for k in children.read_text().split()]
            except (OSError, ValueError):
                continue  # the task ended while we read
            found += kids
            todo += kids
    return found


def pss_mib(pid: int) -> float:
    """Proportional set size of one process in MiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def tree_pss_mib(pid: int) -> float:
    """PSS of ``pid`` and all its descendants, in MiB."""
    return sum(pss_mib(p) for p in [pid, *descendants(pid)])


def gpu_mib_by_pid() -> dict[int, float] | None:
    """GPU memory per process as nvidia-smi lists its compute processes, in MiB; None without nvidia-smi or
    when it fails. A container that hides host PIDs lists none of ours, which then reads as no GPU figure."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        listing = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if listing.returncode != 0:
        return None
    used: dict[int, float] = {}
    for line in listing.stdout.splitlines():
        pid, _, mib = line.partition(",")
        try:
            used[int(pid)] = used.get(int(pid), 0.0) + float(mib)
        except ValueError:
            continue  # "[N/A]" or a header from an unexpected nvidia-smi
    return used


def tree_gpu_mib(pid: int) -> float | None:
    """GPU memory of ``pid`` and its descendants in MiB, or None when nvidia-smi shows none of them."""
    used = gpu_mib_by_pid()
    tree = [p for p in [pid, *descendants(pid)] if used and p in used]
    return sum(used[p] for p in tree) if tree else None


class PeakTreeMemory:
    """Samples :func:`tree_pss_mib` of a running process every ``interval`` seconds on a thread; ``peak`` holds
    the largest sample. Steady training reaches its peak every step, so sampling does not miss it. With
    ``gpu=True`` it also samples :func:`tree_gpu_mib` into ``gpu_peak`` (None while nvidia-smi shows nothing)."""

    def __init__(self, pid: int, interval: float = 0.2, gpu: bool = False):
        self.pid, self.interval, self.gpu, self.peak = pid, interval, gpu, 0.0
        self.gpu_peak: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_pss_mib(self.pid))
            if self.gpu and (gpu := tree_gpu_mib(self.pid)) is not None:
                self.gpu_peak = max(self.gpu_peak or 0.0, gpu)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakTreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def available() -> bool:
    """Whether this system exposes what :func:`tree_pss_mib` reads."""
    return Path("/proc/self/smaps_rollup").exists() and any(Path("/proc/self/task").glob("*/children"))


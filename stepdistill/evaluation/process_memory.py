"""Peak memory of a whole process tree, for benchmarks that compare scripts with and without worker processes.

A process's max RSS misses its data-loader workers, and summing the RSS of forked processes counts the pages
they share with their parent twice. The proportional set size (PSS: each shared page split among the
processes mapping it) summed over the tree is what the run costs the machine. Linux only (``/proc``).
"""
from __future__ import annotations

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


class PeakTreeMemory:
    """Samples :func:`tree_pss_mib` of a running process every ``interval`` seconds on a thread; ``peak`` holds
    the largest sample. Steady training reaches its peak every step, so sampling does not miss it."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid, self.interval, self.peak = pid, interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_pss_mib(self.pid))
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


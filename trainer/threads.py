"""How many threads the trainer runs on, and whether its numbers depend on that count.

The trainer's arithmetic is thread-independent by construction where MKL's strict mode is in effect
(`trainer.products`, `trainer.fused`, `trainer.reduce`); where it is not, a run's numbers depend on
its thread count and its hash says so.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

_MKL_CBWR_ALL = -1  # mkl_cbwr_get(MKL_CBWR_ALL): the branch and the strict flag
_MKL_CBWR_AUTO_STRICT = 0x10002  # MKL_CBWR_AUTO | MKL_CBWR_STRICT: best code path, thread-independent
_MKL_CBWR_STRICT = 0x10000


def numbers_depend_on_threads(device_type: str, gemm_thread_independent: bool) -> bool:
    """Whether a run's numbers change with its CPU thread count: only where MKL's thread-independent
    mode is not in effect (`trainer.products.THREAD_INDEPENDENT`); everything else the trainer does
    is thread-independent by construction. (On a GPU the CPU thread count does not enter.)"""
    return device_type == "cpu" and not gemm_thread_independent


def choose_threads(requested: int | None = None, jobs: int = 1, numbers_depend_on_threads: bool = False,
                   limit: int | None = None, probe_seconds: float = 0.2) -> tuple[int, str]:
    """The number of torch threads for one training job, and a sentence saying how it was chosen.

    The policy:
    1. `requested` (a user's --threads) wins.
    2. Otherwise start from the cores this process may run on (its CPU affinity, and the cgroup
       CPU quota where one is set: never `os.cpu_count()` alone) shared among `jobs` concurrent jobs,
       and at most `limit` (the CPUs a scheduler such as Ray gave this job, torch's own count).
    3. When the run's numbers do not depend on the thread count, also leave out the cores other
       processes are keeping busy, measured over `probe_seconds` from /proc/stat (the load average
       where that is missing): on a shared machine two threads contending for one free core burn
       2-5× the CPU of one thread for the same work, spinning at every parallel region.
    4. When they do depend on it (no MKL strict mode: `trainer.products`), step 3 is skipped, so that
       the same run on the same machine gets the same count (and hash) whatever else is running.
    At least one thread, always.
    """
    if requested is not None:
        if requested < 1:
            raise ValueError(f"threads must be at least 1, not {requested}")
        return requested, f"{requested} thread{'s' if requested > 1 else ''}, as asked"
    cores = usable_cores()
    share = max(1, cores // max(1, jobs))
    why = f"{cores} usable core{'s' if cores > 1 else ''}" + (f" shared by {jobs} jobs" if jobs > 1 else "")
    if limit is not None and limit < share:
        share, why = max(1, limit), f"at most {limit} thread{'s' if limit > 1 else ''} for this job"
    if numbers_depend_on_threads:
        return share, f"{share} thread{'s' if share > 1 else ''}: {why} (not lowered for load: this run's " \
                      "numbers depend on its thread count)"
    idle = idle_cores(probe_seconds)
    threads = max(1, min(share, math.floor(idle + 0.25)))  # a core idle 75% of the time counts as free
    if threads < share:
        return threads, f"{threads} thread{'s' if threads > 1 else ''}: {why}, but only {idle:.1f} left idle " \
                        "by other processes"
    return threads, f"{threads} thread{'s' if threads > 1 else ''}: {why}"


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup (v2) CPU quota if any."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cores, math.ceil(quota)) if quota else cores)


def idle_cores(seconds: float = 0.2) -> float:
    """How many of this process' cores other processes leave idle, measured over `seconds`.

    From the per-CPU idle time in /proc/stat (iowait counts as idle; time a hypervisor steals does
    not); where that file is missing, the cores minus the 1-minute load average. This thread sleeps
    while it measures, so its own process counts only through its other threads.
    """
    cpus = _affinity()
    before = _cpu_times()
    if before is None:
        try:
            return max(0.0, usable_cores() - os.getloadavg()[0])
        except (AttributeError, OSError):
            return float(usable_cores())
    time.sleep(seconds)
    after = _cpu_times() or before
    idle = 0.0
    for cpu in cpus:
        if cpu in before and cpu in after:
            total = sum(after[cpu]) - sum(before[cpu])
            idle += (after[cpu][3] + after[cpu][4] - before[cpu][3] - before[cpu][4]) / total if total > 0 else 1.0
    return min(idle, float(usable_cores()))


def _affinity() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def _cpu_times(path: Path = Path("/proc/stat")) -> dict[int, list[int]] | None:
    """Per-CPU jiffies (user nice system idle iowait irq softirq steal), or None without /proc/stat."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    times = {}
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            times[int(name[3:])] = [int(f) for f in fields[:8]]
    return times or None


def _cgroup_quota(path: Path = Path("/sys/fs/cgroup/cpu.max")) -> float | None:
    """Cores allowed by a cgroup v2 quota (`cpu.max` = "quota period"), None when unlimited or unknown."""
    try:
        quota, period = path.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None

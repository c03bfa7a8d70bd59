"""The machine a run is on: the cores this process may use, the load on them, and how many torch threads to run."""

from __future__ import annotations

import math
import os


__all__ = ["available_cores", "choose_threads", "load_average"]


def available_cores() -> int:
    """
    Cores this process may run on: its affinity mask where the OS has one (a container or `taskset` may give it fewer
    than the machine has), else the machine's count.

    Returns:
        `int`: At least 1.
    """
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def load_average() -> tuple[float, float, float]:
    """
    The 1-, 5- and 15-minute load averages, NaN where the platform has none.

    Returns:
        `tuple[float, float, float]`: Runnable processes, averaged over each window.
    """
    try:
        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3


def choose_threads(cores: int, load: float) -> int:
    """
    Torch threads for a run: the cores not already busy, at least one.

    On a machine shared with other jobs, intra-op threads that wait for a busy core slow every operation down many
    times (measured: one thread ran a SmolLM2 `generate` 7x faster than two on two cores under a load of 5), so only the
    idle cores are used.

    Args:
        cores (`int`):
            Cores this process may run on ([`available_cores`]).
        load (`float`):
            The 1-minute load average before the run starts ([`load_average`]); NaN counts as idle.

    Returns:
        `int`: Between 1 and `cores`.
    """
    busy = 0 if math.isnan(load) else math.floor(load)
    return max(1, min(cores, cores - busy))

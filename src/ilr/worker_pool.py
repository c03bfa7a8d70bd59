"""A persistent process pool for CPU-bound work that must be bounded in time and survive crashes: math-verify scoring.

math-verify times out through `signal.alarm`, so only on a main thread; and sympy can hang in C code or crash. Every
call of [`run_pool`] therefore runs in a pool of worker processes (`ProcessPoolExecutor` on a `forkserver` context,
`spawn` where forkserver is missing), whatever thread it is called from:

- work is sent in chunks;
- each item is bounded by `timeout_s` with a `SIGALRM` timer in the worker's main thread;
- each worker exits as soon as the process that created the pool dies, however it dies (`ilr.lifetime.exit_with`);
- a worker stuck in C code, where signals are not delivered, is killed by the parent once `kill_after(timeout_s)` has
  passed; a worker that dies is replaced. The item it was scoring gets status `timeout` or `crash`; a crash also
  fails the items the pool's other workers had in hand (at most `max_workers - 1`) since `ProcessPoolExecutor`
  terminates them too.

As with any `spawn`/`forkserver` pool, a training script must keep its entry point under
`if __name__ == "__main__":`, since the pool's server process imports the main module.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from ilr.lifetime import exit_with, process_start_time
from ilr.machine import available_cores


__all__ = ["kill_after", "run_pool", "shutdown_pool"]

logger = logging.getLogger(__name__)


class _ItemTimeout(BaseException):
    """Raised by the SIGALRM handler. A BaseException, so math-verify's and sympy's `except Exception` let it through."""


def _on_alarm(signum, frame):
    raise _ItemTimeout


_SLOT_FIELDS = 3  # per worker, in shared memory: pid, id of the item being scored (-1: idle), its start time
_worker_slots = None
_worker_slot: int | None = None


def _init_worker(slots, counter, owner: tuple[int, int | None], worker_init: Callable[[], None] | None) -> None:
    global _worker_slots, _worker_slot
    # Whatever kills the process that owns the pool (even SIGKILL, which runs no atexit), the worker exits with it;
    # the fork server and resource tracker then see their pipes close and exit too.
    exit_with(*owner)
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    # The parent owns shutdown; a Ctrl-C in the terminal should not print a traceback per worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if worker_init is not None:
        worker_init()
    if _SLOT_FIELDS * (index + 1) <= len(slots):
        _worker_slots, _worker_slot = slots, index
        slots[_SLOT_FIELDS * index] = os.getpid()  # last: a pid in the slot means "ready"


def _run_one(fn: Callable, payload: Any, timeout_s: float, use_timer: bool) -> tuple[str, Any]:
    try:
        if use_timer:
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            value = fn(payload)
        finally:
            if use_timer:
                signal.setitimer(signal.ITIMER_REAL, 0)
        return "ok", value
    except _ItemTimeout:
        return "timeout", None
    except Exception as error:
        logger.debug("Scoring failed for %.200r", payload, exc_info=True)
        return "error", f"{type(error).__name__}: {error}"[:300]


def _run_chunk(fn: Callable, chunk: list[tuple[int, Any]], timeout_s: float) -> tuple[int, list[tuple[int, str, Any]]]:
    """Apply `fn` to each `(item id, payload)` with a per-item time bound; returns `(pid, [(id, status, value)])`."""
    use_timer = threading.current_thread() is threading.main_thread()
    if use_timer:
        # Keep whatever timer the host had armed (e.g. pytest-timeout in inline mode) and re-arm it afterwards.
        old_handler = signal.signal(signal.SIGALRM, _on_alarm)
        old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, 0)
        started = time.monotonic()
    else:
        logger.debug("Scoring off the main thread without a pool: items are not time-bounded.")
    slots, base = _worker_slots, _SLOT_FIELDS * (_worker_slot or 0)
    out = []
    try:
        for item_id, payload in chunk:
            if slots is not None:
                slots[base + 2] = time.monotonic()  # the start before the id: the parent reads them the other way
                slots[base + 1] = item_id
            out.append((item_id, *_run_one(fn, payload, timeout_s, use_timer)))
            if slots is not None:
                slots[base + 1] = -1
    finally:
        if use_timer:
            signal.signal(signal.SIGALRM, old_handler)
            if old_delay > 0:
                signal.setitimer(signal.ITIMER_REAL, max(old_delay - (time.monotonic() - started), 1e-3), old_interval)
    return os.getpid(), out


# ---------------------------------------------------------------------------------------------------------------------
# The pool (parent side)
# ---------------------------------------------------------------------------------------------------------------------

_POLL_S = 0.05
_CHUNKS_PER_WORKER = 8
_MAX_CHUNK = 64

# One batch at a time: it also makes item ids in the shared slots unambiguous, and the pool is CPU-bound anyway.
_POOL_LOCK = threading.Lock()
_pool: ProcessPoolExecutor | None = None
_pool_slots = None
_pool_workers = 0
_pool_owner = 0  # pid that created the pool: a forked child must not use its parent's pool
_pool_init: Callable[[], None] | None = None  # the pool's workers ran this at start
_warned_inline = False
_pool_unavailable = False  # set when workers cannot start at all; then everything is scored inline


def _reset_after_fork() -> None:
    global _POOL_LOCK, _pool, _pool_slots, _pool_workers, _pool_owner, _pool_init
    _POOL_LOCK = threading.Lock()
    _pool, _pool_slots, _pool_workers, _pool_owner, _pool_init = None, None, 0, 0, None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def kill_after(timeout_s: float) -> float:
    """When the parent kills a worker whose item ignored its SIGALRM (stuck in C code)."""
    return timeout_s * 1.5 + 1.0


def _mp_context():
    # Never plain fork: the trainer process holds torch and CUDA threads.
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method)


def _get_pool(workers: int, worker_init: Callable[[], None] | None) -> tuple[ProcessPoolExecutor, Any]:
    global _pool, _pool_slots, _pool_workers, _pool_owner, _pool_init
    # A pool is reused only by the process that made it, at the same size, with workers set up the same way.
    stale = _pool_owner != os.getpid() or _pool_workers != workers or _pool_init is not worker_init
    if _pool is not None and stale:
        if _pool_owner == os.getpid():
            _pool.shutdown(wait=True, cancel_futures=True)
        _pool = None
    if _pool is None:
        ctx = _mp_context()
        slots = ctx.Array("d", _SLOT_FIELDS * workers, lock=False)
        for k in range(workers):
            slots[_SLOT_FIELDS * k + 1] = -1
        counter = ctx.Value("i", 0)
        owner = (os.getpid(), process_start_time(os.getpid()))
        _pool = ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_init_worker, initargs=(slots, counter, owner, worker_init)
        )
        _pool_slots, _pool_workers, _pool_owner, _pool_init = slots, workers, os.getpid(), worker_init
        _wait_until_ready(_pool, slots, workers)
    return _pool, _pool_slots


def _wait_until_ready(pool: ProcessPoolExecutor, slots, workers: int, limit_s: float = 120.0) -> None:
    """Start every worker and wait for them: otherwise the first one up would take a whole small batch alone."""
    probes = [pool.submit(os.getpid) for _ in range(workers)]  # the executor spawns one process per waiting task
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if all(slots[_SLOT_FIELDS * k] > 0 for k in range(workers)):
            return
        if any(p.done() and p.exception() is not None for p in probes):
            return  # broken: the caller finds out when it submits
        time.sleep(0.01)


def _discard_pool() -> None:
    global _pool
    if _pool is not None:
        _pool.shutdown(wait=False, cancel_futures=True)
    _pool = None


def shutdown_pool() -> None:
    """
    Stop the worker processes. The next [`run_pool`] call starts a new pool; also run at interpreter exit.
    """
    global _pool, _pool_unavailable
    with _POOL_LOCK:
        if _pool is not None and _pool_owner == os.getpid():
            _pool.shutdown(wait=True, cancel_futures=True)
        _pool, _pool_unavailable = None, False


atexit.register(shutdown_pool)


def _in_flight(slots) -> dict[int, int]:
    """`{item id: worker pid}` for the items the workers are scoring right now."""
    busy = {}
    for k in range(len(slots) // _SLOT_FIELDS):
        item = int(slots[_SLOT_FIELDS * k + 1])
        if item >= 0:
            busy[item] = int(slots[_SLOT_FIELDS * k])
    return busy


def _kill_overdue(slots, limit_s: float) -> set[int]:
    killed = set()
    now = time.monotonic()
    for k in range(len(slots) // _SLOT_FIELDS):
        base = _SLOT_FIELDS * k
        item = int(slots[base + 1])  # the id before the start time: see `_run_chunk`
        if item < 0 or now - slots[base + 2] <= limit_s:
            continue
        pid = int(slots[base])
        if pid > 0 and pid != os.getpid():  # pid 0 would signal our whole process group
            with contextlib.suppress(ProcessLookupError):  # it finished and exited meanwhile
                os.kill(pid, signal.SIGKILL)
        slots[base + 1] = -1
        killed.add(item)
    return killed


def _run_inline(
    fn: Callable, chunk: list[tuple[int, Any]], timeout_s: float, inline_init: Callable[[], None] | None
) -> list[tuple[str, Any, int]]:
    if inline_init is not None:
        inline_init()
    pid, out = _run_chunk(fn, chunk, timeout_s)
    return [(status, value, pid) for _, status, value in out]


class _WorkersDoNotStart(Exception):
    pass


def _run_round(
    fn: Callable,
    payloads: list,
    ids: list[int],
    timeout_s: float,
    outcomes: list,
    workers: int,
    worker_init: Callable[[], None] | None,
) -> bool:
    """Score the items `ids` in the pool, filling `outcomes`; returns whether the pool broke (a worker died)."""
    pool, slots = _get_pool(workers, worker_init)
    size = min(_MAX_CHUNK, max(1, math.ceil(len(ids) / (workers * _CHUNKS_PER_WORKER))))
    futures, broken, killed, crashed = [], False, set(), {}
    try:
        for start in range(0, len(ids), size):
            chunk = [(i, payloads[i]) for i in ids[start : start + size]]
            futures.append(pool.submit(_run_chunk, fn, chunk, timeout_s))
    except BrokenProcessPool:
        broken = True
    pending = set(futures)
    while pending:
        done, pending = wait(pending, timeout=_POLL_S, return_when=FIRST_COMPLETED)
        for future in done:
            try:
                pid, out = future.result()
            except BrokenProcessPool:
                if not broken and not killed:
                    crashed = _in_flight(slots)  # whoever was scoring something when a worker died
                broken = True
                continue
            for item_id, status, value in out:
                outcomes[item_id] = (status, value, pid)
        if not broken:
            killed |= _kill_overdue(slots, kill_after(timeout_s))
    for item_id in killed:
        if outcomes[item_id] is None:
            outcomes[item_id] = ("timeout", None, None)
    for item_id, pid in crashed.items():
        if outcomes[item_id] is None:
            outcomes[item_id] = ("crash", None, pid)
    if broken and not any(slots[_SLOT_FIELDS * k] > 0 for k in range(workers)):
        raise _WorkersDoNotStart
    return broken


def run_pool(
    fn: Callable,
    payloads: list,
    *,
    max_workers: int | None = None,
    timeout_s: float = 5.0,
    worker_init: Callable[[], None] | None = None,
    inline_init: Callable[[], None] | None = None,
) -> list[tuple[str, Any, int | None]]:
    """
    Apply a module-level `fn` to every payload in the worker pool, each bounded in time.

    Items whose worker died are retried in a fresh pool, except the one it was scoring (see the module docstring).
    `worker_init` (module-level) runs once in each new worker, `inline_init` before scoring in the calling thread.

    Returns one `(status, value, worker pid)` per payload, in order; status is `"ok"`, `"timeout"`, `"crash"` or
    `"error"` (value `None`, or the error text for `"error"`). `max_workers=0` runs in the calling thread instead
    (time-bounded only on the main thread); so do a daemonic process, which may not have children, and a process
    whose workers cannot start (logged as an error).
    """
    global _warned_inline, _pool_unavailable
    if timeout_s <= 0:
        raise ValueError(f"`timeout_s` must be positive, got {timeout_s}.")
    workers = available_cores() if max_workers is None else max_workers
    if workers < 0:
        raise ValueError(f"`max_workers` must be >= 0 (0: no pool), got {max_workers}.")
    if not payloads:
        return []
    if workers == 0 or _pool_unavailable or multiprocessing.current_process().daemon:
        if workers and not _warned_inline:
            logger.warning("No worker pool in this process: rewards are scored inline, in the calling thread.")
            _warned_inline = True
        return _run_inline(fn, list(enumerate(payloads)), timeout_s, inline_init)

    outcomes: list = [None] * len(payloads)
    remaining = list(range(len(payloads)))
    fruitless_rounds = 0
    with _POOL_LOCK:
        try:
            while remaining:
                if _run_round(fn, payloads, remaining, timeout_s, outcomes, workers, worker_init):
                    _discard_pool()
                still = [i for i in remaining if outcomes[i] is None]
                fruitless_rounds = fruitless_rounds + 1 if len(still) == len(remaining) else 0
                if still and fruitless_rounds >= 3:
                    logger.error("The worker pool keeps failing; %d items left unscored.", len(still))
                    for i in still:
                        outcomes[i] = ("crash", None, None)
                    still = []
                remaining = still
        except _WorkersDoNotStart:
            # E.g. a script read from stdin, which the workers cannot re-import as `__main__`.
            logger.error(
                "The worker processes fail to start (see their traceback above); scoring inline, in the "
                "calling thread, from now on. `shutdown_pool()` (`ilr.rewards.shutdown_reward_pool`) lets the next call try again."
            )
            _discard_pool()
            _pool_unavailable = True
            remaining = [i for i in remaining if outcomes[i] is None]
            inline = _run_inline(fn, [(i, payloads[i]) for i in remaining], timeout_s, inline_init)
            for item_id, outcome in zip(remaining, inline):
                outcomes[item_id] = outcome
        except BaseException:
            # E.g. Ctrl-C while waiting: tasks left running would keep the workers busy, and their item ids would clash
            # with the next batch's in the shared slots.
            _discard_pool()
            raise
    return outcomes

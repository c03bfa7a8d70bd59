"""Helper processes that end with the process that started them, however it dies.

A process killed with SIGKILL (the OOM killer, a preemption, `kill -9`) runs no cleanup, so its helpers must notice on
their own. `exit_with` does it from inside a helper: a watchdog thread waits on a pidfd of the owner (Linux 5.3+) and
ends the helper the moment the owner is gone; elsewhere it polls the owner every half second. Unlike
`PR_SET_PDEATHSIG`, it follows the owner *process*, not the thread that started the helper, and works for a helper
whose parent is not its owner (a `forkserver` child's parent is the fork server). See `ilr.rewards` for its use.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import subprocess
import threading
import time
from pathlib import Path


__all__ = ["exit_with", "process_start_time", "start_child", "stop_child"]

_POLL_S = 0.5
_PR_SET_PDEATHSIG = 1


def process_start_time(pid: int) -> int | None:
    """
    When process `pid` started, in clock ticks since boot (`/proc/<pid>/stat`); with its pid, it names one process
    even after the pid is reused.

    Args:
        pid (`int`):
            A process id.

    Returns:
        `int | None`: The start time, or `None` where `/proc` is missing (not Linux) or the process does not exist.
    """
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def _stat_fields(pid: int) -> list[bytes] | None:
    """The fields of `/proc/<pid>/stat` after the command name (state first), or `None` where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # The command name (field 2) may hold spaces and parentheses: split after its closing parenthesis.
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields if len(fields) > 19 else None


def _is_alive(pid: int, start_time: int | None) -> bool:
    try:
        os.kill(pid, 0)  # also succeeds on a zombie, hence the state check below
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    fields = _stat_fields(pid)
    if fields is None:  # without /proc (macOS) os.kill's answer stands; with it, the process exited meanwhile
        return not os.path.isdir("/proc/self")
    return fields[0] != b"Z" and (start_time is None or int(fields[19]) == start_time)


def _open_pidfd(pid: int, start_time: int | None) -> int | None:
    """A pidfd of the owner, or `None` where the system has none. Raises `ProcessLookupError` if the owner is gone."""
    if not hasattr(os, "pidfd_open"):
        return None
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise
    except OSError:  # ENOSYS on kernels before 5.3, EPERM under some seccomp profiles
        return None
    # The pid may have been reused between the owner's death and `pidfd_open`; the start time tells them apart.
    if start_time is not None and process_start_time(pid) not in (start_time, None):
        os.close(pidfd)
        raise ProcessLookupError(pid)
    return pidfd


def _watch(pid: int, start_time: int | None, pidfd: int | None) -> None:
    # Leave every signal to the main thread: a SIGALRM landing here would not interrupt the work it is meant to bound.
    with contextlib.suppress(AttributeError, OSError, ValueError):
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    if pidfd is not None:
        select.select([pidfd], [], [])  # readable once the owner has exited
    else:
        while _is_alive(pid, start_time):
            time.sleep(_POLL_S)
    # No cleanup: the owner that would collect results is gone, and a worker may be stuck in C code.
    os._exit(0)


def exit_with(pid: int, start_time: int | None = None) -> None:
    """
    Make the calling process exit as soon as process `pid` has ended, whatever ended it (SIGKILL included).

    Call it early in a helper process (a pool worker's initializer). A daemon thread watches the owner: on Linux 5.3+
    it blocks on a pidfd and reacts within milliseconds; elsewhere on POSIX it polls every 0.5 s. The helper then ends
    with `os._exit`, without cleanup, even if its main thread is stuck in C code. Does nothing on Windows, where
    `os.kill` cannot probe a process.

    Args:
        pid (`int`):
            The owner: the process whose death should end this one (e.g. the trainer that created a worker pool).
        start_time (`int`, *optional*):
            The owner's `process_start_time`, read by the owner itself; guards against the pid being reused by an
            unrelated process before the watch begins. Without it, only the pid is checked.
    """
    if os.name != "posix":
        return
    try:
        pidfd = _open_pidfd(pid, start_time)
        if pidfd is None and not _is_alive(pid, start_time):
            raise ProcessLookupError(pid)
    except ProcessLookupError:
        os._exit(0)  # the owner died before the watch began
    threading.Thread(target=_watch, args=(pid, start_time, pidfd), name="ilr-exit-with-owner", daemon=True).start()


# Children started from the parent's side: the kernel ends them when the parent dies (PR_SET_PDEATHSIG, Linux).
def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel sends it SIGKILL when the process that started it dies."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def start_child(
    command: list[str], log: str | Path, env: dict[str, str] | None = None, *, append: bool = False
) -> subprocess.Popen:
    """
    Start a child process that cannot outlive this one: SIGKILLed by the kernel when this process dies, however it
    dies (`PR_SET_PDEATHSIG`, Linux), and in its own process group so that [`stop_child`] reaches its children too.

    Args:
        command (`list[str]`):
            The program and its arguments.
        log (`str` or `Path`):
            File that receives its stdout and stderr.
        env (`dict[str, str]`, *optional*):
            Its environment; defaults to this process's.
        append (`bool`, *optional*, defaults to `False`):
            Add to `log` instead of replacing it (a resumed run keeps the output of the attempts before).

    Returns:
        `subprocess.Popen`: The child.
    """
    with open(log, "ab" if append else "wb") as out:
        return subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )


def stop_child(process: subprocess.Popen, grace: float = 20.0) -> None:
    """
    Stop a child of [`start_child`] and its process group: SIGTERM, then SIGKILL after `grace` seconds.

    Args:
        process (`subprocess.Popen`):
            The child.
        grace (`float`, *optional*, defaults to `20.0`):
            Seconds it gets to exit after SIGTERM.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

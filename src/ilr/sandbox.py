"""Isolated execution of model-written Python code against tests (the code reward and code evaluation).

Model-written code is untrusted: it can loop forever, fork-bomb, allocate all memory, print gigabytes, write over
files, read secrets or open network connections. Execution is therefore refused unless enabled explicitly, with
`allow=True` (the `allow_code_execution` config field) or the environment variable `ILR_ALLOW_CODE_EXECUTION=1`.

How one run works:

1. The parent creates a private temporary directory and starts a *launcher* (this file, run as a script with
   `python -I -S`) in a new session, with a minimal environment (no `HF_TOKEN` or other secrets), stdin on
   `/dev/null` and three pipes: a payload pipe (a random nonce, then the code), a result pipe and a control pipe.
2. The launcher isolates and forks the *sandbox process*, which sets resource limits (`RLIMIT_AS`, `RLIMIT_CPU`,
   `RLIMIT_FSIZE`, `RLIMIT_NPROC`, `RLIMIT_NOFILE`, `RLIMIT_CORE`), sets `no_new_privs`, installs a seccomp filter
   that refuses every non-Unix socket and `io_uring` (x86-64 and aarch64), and execs a small harness with
   `python -I -B`. The launcher enforces the wall-clock timeout and kills the sandbox's whole process tree afterwards,
   or as soon as the caller dies, however it dies (a parent-death signal).
3. The harness reads the nonce and the code, closes the payload pipe, runs `setup` then the solution in a fresh
   namespace (with `__name__ == "__solution__"`, so `if __name__ == "__main__":` blocks do not run), then each test
   in its own `try`/`except`, and writes one nonce-tagged line per test to the result pipe. Only tagged results count: missing or garbled ones are failures, so `os._exit(0)`, crashing, or printing a
   fake "PASS" scores 0. The harness binds what it calls (`exec`, `compile`, ...) before the solution runs, so that
   monkeypatching them changes nothing, and only the harness process itself reports, not the children it forks.

Isolation modes, picked at the first run by probing what the machine allows (`sandbox_isolation`; force one with
`ILR_SANDBOX_ISOLATION=namespace|process`):

- `"namespace"` (root, or non-root where unprivileged user namespaces work): new PID, network, mount, IPC and UTS
  namespaces. The sandbox process is the init of its PID namespace, so killing it kills every process inside,
  including ones that double-fork or `setsid`. The network namespace has only a downed loopback. The file system is
  a fresh tmpfs root (pivot_root) holding read-only bind mounts of `/usr`, `/lib*`, `/bin`, a few `/etc` files and the
  Python installation, private tmpfs mounts for the working directory, `/tmp` and `/dev/shm` (so nothing written
  reaches the host disk), a few device nodes and a `/proc` that shows only the sandbox. As root the code runs under
  a fresh unprivileged uid/gid (random in `[ILR_SANDBOX_UID_BASE, +2**20)`, default base `0x7A000000`, a range
  systemd leaves unused) so that `RLIMIT_NPROC` applies (the kernel does not enforce it for root) and counts only
  this sandbox: fork bombs stop at `max_processes`. Being a PID namespace's init, the harness ignores signals
  that have no handler (e.g. `signal.alarm` without one); the CPU-time limit still kills it through `SIGKILL`. Without root the code runs as the caller's own uid inside the
  user namespace, which has no capabilities after exec; `RLIMIT_NPROC` is then counted per user namespace (Linux
  5.14+), or against all of the user's processes on older kernels.
- `"process"` (fallback when namespaces are refused, e.g. Docker without `CAP_SYS_ADMIN`): `setsid` plus a
  child-subreaper launcher that kills the process group and every orphan reparented to it, rlimits, the seccomp
  socket filter (the only network block here), and the host file system with the working directory as cwd, `HOME`
  and `TMPDIR`. As root the code still drops to a fresh uid when the interpreter is readable by others; otherwise it
  runs as root, which cannot contain fork bombs or protect files: a warning is logged once.

`ExecutionResult.status` is one of:

- `"ok"`: the harness ran every test (each one passed or failed).
- `"error"`: `setup` or the solution raised (a syntax error included); no test ran.
- `"timeout"`: the wall-clock limit was hit; tests reported before it still count.
- `"killed"`: the sandbox died from a signal (CPU-time limit, crash) before reporting every test.
- `"exited"`: the sandbox exited before reporting every test (e.g. `os._exit`).
- `"sandbox_error"`: the sandbox itself could not start (an infrastructure problem, not the model's fault).

Residual risks, documented rather than solved:

- Tests run in the same interpreter as the solution, so a deliberately adversarial solution can inspect the harness
  (frames, closures, `gc`) to find the nonce and forge results, or return objects whose `__eq__` is always true. The
  nonce stops accidental and naive cheats (exiting early, printing "PASS"), not a determined attacker.
- The sandbox shares the host kernel: a kernel exploit escapes it. seccomp only filters sockets and `io_uring`.
- Memory is limited by `RLIMIT_AS` (virtual memory) per process, not by a cgroup, so `max_processes` processes can
  each use `memory_mb`; private tmpfs mounts add up to `4 * max_file_size_mb` MiB each (three of them).
- In `"process"` mode the code sees the host file system and `/proc` with the caller's permissions (or root's, see
  above): it can read the initial environment of the caller's other processes (`/proc/<pid>/environ`, so tokens
  exported in the shell that started training), write wherever the caller can, and reach Unix sockets such as a
  Docker socket; its working directory is on the host disk. Prefer a machine where `"namespace"` works.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import re
import secrets
import select
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass


try:  # Unix only; imported here because the launcher cannot import anything once inside the sandbox's root
    import resource
except ImportError:  # pragma: no cover - the sandbox needs Linux anyway
    resource = None

__all__ = [
    "ALLOW_ENV_VAR",
    "CodeExecutionDisabledError",
    "ExecutionResult",
    "SandboxLimits",
    "code_execution_allowed",
    "extract_python_code",
    "run_tests",
    "run_tests_batch",
    "sandbox_isolation",
]

logger = logging.getLogger(__name__)

ALLOW_ENV_VAR = "ILR_ALLOW_CODE_EXECUTION"
ISOLATION_ENV_VAR = "ILR_SANDBOX_ISOLATION"
UID_BASE_ENV_VAR = "ILR_SANDBOX_UID_BASE"
_DEFAULT_UID_BASE = 0x7A000000  # inside 0x70000000-0x7FFFFFFF, which systemd's uid table leaves unused
_UID_SPAN = 1 << 20
_LAUNCHER_FLAG = "--ilr-sandbox-launcher"
# The launcher gets this long after `timeout_s` to kill and report before the parent kills the launcher itself.
_GRACE_S = 10.0
_MAX_RESULT_BYTES = 1 << 20
_TRUNCATION_NOTE = "\n[... output truncated by the sandbox ...]\n"


@dataclass(frozen=True)
class SandboxLimits:
    """
    Resource limits for one sandboxed run.

    Args:
        timeout_s (`float`, *optional*, defaults to `10.0`):
            Wall-clock limit for the whole run (interpreter start, setup, solution and all tests).
        cpu_time_s (`int`, *optional*, defaults to `10`):
            CPU-time limit per process (`RLIMIT_CPU`).
        memory_mb (`int`, *optional*, defaults to `1024`):
            Address-space limit per process in MiB (`RLIMIT_AS`).
        max_output_bytes (`int`, *optional*, defaults to `65536`):
            Bytes of stdout and of stderr kept each; the rest is read and dropped.
        max_processes (`int`, *optional*, defaults to `32`):
            Processes and threads the sandbox may have at once (`RLIMIT_NPROC`).
        max_file_size_mb (`int`, *optional*, defaults to `16`):
            Largest file the code may write, in MiB (`RLIMIT_FSIZE`). The private tmpfs mounts get 4 times this.
    """

    timeout_s: float = 10.0
    cpu_time_s: int = 10
    memory_mb: int = 1024
    max_output_bytes: int = 65536
    max_processes: int = 32
    max_file_size_mb: int = 16

    def __post_init__(self) -> None:
        for name in ("timeout_s", "cpu_time_s", "memory_mb", "max_output_bytes", "max_processes", "max_file_size_mb"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SandboxLimits.{name} must be positive, got {getattr(self, name)!r}.")


@dataclass
class ExecutionResult:
    """
    Outcome of running one program against its tests.

    Args:
        passed (`int`):
            Number of tests that passed.
        total (`int`):
            Number of tests.
        status (`str`):
            `"ok"`, `"error"`, `"timeout"`, `"killed"`, `"exited"` or `"sandbox_error"` (see the module docstring).
        stdout (`str`):
            The program's standard output, capped at `SandboxLimits.max_output_bytes`.
        stderr (`str`):
            The program's standard error (tracebacks of failing tests included), capped the same way.
        duration_s (`float`):
            Wall-clock seconds for the whole run, sandbox start-up included.
        isolation (`str`, *optional*, defaults to `""`):
            How the run was isolated: `"namespace"` or `"process"`, with `"+uid"` when it ran under a dropped uid.
    """

    passed: int
    total: int
    status: str
    stdout: str
    stderr: str
    duration_s: float
    isolation: str = ""

    @property
    def fraction(self) -> float:
        """Fraction of tests passed, in [0, 1]; `0.0` when there are no tests."""
        return self.passed / self.total if self.total > 0 else 0.0


class CodeExecutionDisabledError(RuntimeError):
    """Raised when model-written code would run but execution has not been enabled explicitly."""


def code_execution_allowed(allow: bool | None = None) -> bool:
    """
    Whether running model-written code is enabled.

    Either opt-in enables it: `allow=True`, or the environment variable `ILR_ALLOW_CODE_EXECUTION` set to `1`, `true`
    or `yes`. `allow=False` does not override the environment variable, so that a config default of `False` still
    lets an operator enable execution from the environment.

    Args:
        allow (`bool`, *optional*):
            The caller's explicit opt-in, e.g. the `allow_code_execution` config field.

    Returns:
        `bool`: `True` when execution is enabled.
    """
    if allow:
        return True
    return os.environ.get(ALLOW_ENV_VAR, "").strip().lower() in ("1", "true", "yes")


def _require_allowed(allow: bool | None) -> None:
    if not code_execution_allowed(allow):
        raise CodeExecutionDisabledError(
            "Refusing to execute model-written code: it is untrusted and may be harmful, even inside the sandbox. "
            f"Enable it explicitly with `allow_code_execution=True` in the config (`allow=True`) or by setting "
            f"the environment variable {ALLOW_ENV_VAR}=1."
        )


def run_tests(
    program: str,
    tests: list[str],
    *,
    setup: str = "",
    limits: SandboxLimits | None = None,
    allow: bool | None = None,
) -> ExecutionResult:
    """
    Run a program against tests in the sandbox and score it by the fraction of tests passed.

    Args:
        program (`str`):
            The model-written code (the solution).
        tests (`list[str]`):
            Standalone test snippets such as `assert f(1) == 2`, each run after the solution in its namespace.
        setup (`str`, *optional*, defaults to `""`):
            Code run before the solution, e.g. MBPP's `test_setup_code` and imports.
        limits (`SandboxLimits`, *optional*):
            Resource limits; `SandboxLimits()` when not given.
        allow (`bool`, *optional*):
            Explicit opt-in to execute code (see `code_execution_allowed`).

    Returns:
        `ExecutionResult`: tests passed, status, capped output and duration.

    Raises:
        `CodeExecutionDisabledError`: execution was not enabled.
        `ValueError`: `tests` is empty (a program without tests cannot be scored).
        `RuntimeError`: no isolation mode works on this machine.
    """
    _require_allowed(allow)
    _validate_job(program, tests, setup)
    return _execute(program, list(tests), setup, limits or SandboxLimits(), sandbox_isolation())


def run_tests_batch(
    jobs: list[tuple[str, list[str], str]],
    *,
    limits: SandboxLimits | None = None,
    max_workers: int | None = None,
    allow: bool | None = None,
) -> list[ExecutionResult]:
    """
    Run many programs concurrently, each in its own sandbox.

    Args:
        jobs (`list[tuple[str, list[str], str]]`):
            `(program, tests, setup)` triples.
        limits (`SandboxLimits`, *optional*):
            Resource limits for every job; `SandboxLimits()` when not given.
        max_workers (`int`, *optional*):
            Sandboxes running at once; the number of CPU cores when not given.
        allow (`bool`, *optional*):
            Explicit opt-in to execute code (see `code_execution_allowed`).

    Returns:
        `list[ExecutionResult]`: one result per job, in the order of `jobs`.
    """
    from concurrent.futures import ThreadPoolExecutor

    _require_allowed(allow)
    for program, tests, setup in jobs:
        _validate_job(program, tests, setup)
    if not jobs:
        return []
    limits = limits or SandboxLimits()
    isolation = sandbox_isolation()
    workers = max(1, min(len(jobs), max_workers or os.cpu_count() or 1))
    # Threads suffice: each one only waits on its sandbox's pipes.
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ilr-sandbox") as pool:
        futures = [
            pool.submit(_execute, program, list(tests), setup, limits, isolation) for program, tests, setup in jobs
        ]
        return [future.result() for future in futures]


_FENCE_RE = re.compile(r"^[ \t]*```[ \t]*([\w+-]*)[^\n]*\n(.*?)^[ \t]*```", re.DOTALL | re.MULTILINE)


def extract_python_code(completion: str) -> str | None:
    """
    Extract the last Python code block from a model completion.

    Blocks fenced with `` ```python ``, `` ```py ``, `` ```python3 `` or a bare `` ``` `` count; blocks in other languages,
    empty blocks and an unclosed final fence (a truncated completion) do not.

    Args:
        completion (`str`):
            The model's text.

    Returns:
        `str` or `None`: the code of the last Python block, or `None` when there is none.
    """
    blocks = [
        code
        for language, code in _FENCE_RE.findall(completion)
        if language.lower() in ("", "python", "py", "python3") and code.strip()
    ]
    return blocks[-1].rstrip("\n") if blocks else None


# --------------------------------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------------------------------


def _validate_job(program: str, tests: list[str], setup: str) -> None:
    if not isinstance(program, str) or not isinstance(setup, str):
        raise TypeError("`program` and `setup` must be strings.")
    if isinstance(tests, str) or not all(isinstance(test, str) for test in tests):
        raise TypeError("`tests` must be a list of strings.")
    if len(tests) == 0:
        raise ValueError("`tests` is empty: a program cannot be scored without tests.")


_isolation_lock = threading.Lock()
_isolation: str | None = None


def sandbox_isolation() -> str:
    """
    The isolation mode used on this machine, probed once per process.

    `"namespace"` is preferred; `"process"` is the fallback (see the module docstring). The environment variable
    `ILR_SANDBOX_ISOLATION` forces either.

    Returns:
        `str`: `"namespace"` or `"process"`.

    Raises:
        `RuntimeError`: neither mode can run code on this machine.
    """
    global _isolation
    forced = os.environ.get(ISOLATION_ENV_VAR, "auto").strip().lower()
    if forced in ("namespace", "process"):
        return forced
    if forced not in ("", "auto"):
        raise ValueError(f"{ISOLATION_ENV_VAR} must be 'auto', 'namespace' or 'process', got {forced!r}.")
    with _isolation_lock:
        if _isolation is None:
            failures = []
            for mode in ("namespace", "process"):
                probe = _execute("x = 1", ["assert x == 1"], "", SandboxLimits(timeout_s=30.0), mode)
                if probe.status == "ok" and probe.passed == 1:
                    _isolation = mode
                    break
                failures.append(f"{mode}: {probe.status}: {probe.stderr.strip()[-2000:]}")
            else:
                raise RuntimeError("The code sandbox cannot run on this machine:\n" + "\n".join(failures))
            if _isolation != "namespace":
                logger.warning(
                    "Linux namespaces are not available, so model-written code runs with weaker isolation (process "
                    "group, rlimits and a seccomp socket filter, on the host file system). Probe: %s",
                    failures[0],
                )
        return _isolation


_uid_lock = threading.Lock()
_uids_in_use: set[int] = set()
_root_warning_logged = False


def _acquire_uid() -> int:
    base = int(os.environ.get(UID_BASE_ENV_VAR, _DEFAULT_UID_BASE))
    with _uid_lock:
        while True:
            uid = base + secrets.randbelow(_UID_SPAN)
            if uid not in _uids_in_use:
                _uids_in_use.add(uid)
                return uid


def _release_uid(uid: int | None) -> None:
    if uid is not None:
        with _uid_lock:
            _uids_in_use.discard(uid)


def _interpreter_paths() -> list[str]:
    """Directories the sandbox needs to start this interpreter, under their own names and resolved."""
    paths = {
        sys.prefix,
        sys.exec_prefix,
        sys.base_prefix,
        sys.base_exec_prefix,
        os.path.dirname(sys.executable),
        os.path.dirname(os.path.realpath(sys.executable)),
    }
    paths.update(p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p)
    return sorted({q for p in paths if p and os.path.isabs(p) for q in (p, os.path.realpath(p))})


def _readable_by_others(path: str) -> bool:
    """Whether an unprivileged uid can reach and run `path` (for dropping root without a mount namespace)."""
    path = os.path.realpath(path)
    parts = path.split(os.sep)
    try:
        for i in range(2, len(parts)):
            if not os.stat(os.sep.join(parts[:i])).st_mode & stat.S_IXOTH:
                return False
        return os.stat(path).st_mode & (stat.S_IROTH | stat.S_IXOTH) == (stat.S_IROTH | stat.S_IXOTH)
    except OSError:
        return False


def _sandbox_env(workdir: str) -> dict[str, str]:
    # Built from scratch so that nothing from the parent (tokens, credentials, proxies) reaches the sandbox.
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": workdir,
        "TMPDIR": workdir,
        # Numeric libraries would otherwise start a thread per core, which RLIMIT_NPROC counts.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    if os.environ.get("LD_LIBRARY_PATH"):
        env["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
    return env


def _execute(program: str, tests: list[str], setup: str, limits: SandboxLimits, mode: str) -> ExecutionResult:
    global _root_warning_logged
    start = time.monotonic()
    uid = None
    if os.geteuid() == 0:
        if mode == "namespace" or all(map(_readable_by_others, (sys.executable, sys.prefix, sys.base_prefix))):
            uid = _acquire_uid()
        elif not _root_warning_logged:
            _root_warning_logged = True
            logger.warning(
                "The sandbox runs model-written code as root: no namespaces, and the interpreter %s is not readable "
                "by other users, so privileges cannot be dropped. Fork bombs and file writes are not contained.",
                sys.executable,
            )
    workdir = tempfile.mkdtemp(prefix="ilr-sandbox-")
    nonce = secrets.token_hex(16)
    pipes: list[int] = []
    proc = None
    try:
        if uid is not None and mode == "process":
            os.chown(workdir, uid, uid)
        payload_r, payload_w = os.pipe()
        result_r, result_w = os.pipe()
        control_r, control_w = os.pipe()
        pipes = [payload_r, payload_w, result_r, result_w, control_r, control_w]
        tmpfs_mb = 4 * limits.max_file_size_mb
        config = {
            "mode": mode,
            "parent_pid": os.getpid(),
            "uid": uid,
            "workdir": workdir,
            "python": sys.executable,
            "python_paths": _interpreter_paths(),
            "harness": _HARNESS,
            "env": _sandbox_env(workdir),
            "payload_fd": payload_r,
            "result_fd": result_w,
            "control_fd": control_w,
            "timeout_s": limits.timeout_s,
            "cpu_time_s": limits.cpu_time_s,
            "memory_bytes": limits.memory_mb * 1024 * 1024,
            "max_processes": limits.max_processes,
            "file_size_bytes": limits.max_file_size_mb * 1024 * 1024,
            "tmpfs_bytes": tmpfs_mb * 1024 * 1024,
        }
        payload = json.dumps({"nonce": nonce, "setup": setup, "program": program, "tests": tests}).encode()
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), _LAUNCHER_FLAG, json.dumps(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(payload_r, result_w, control_w),
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            cwd="/",
            start_new_session=True,
        )
        for fd in (payload_r, result_w, control_w):
            os.close(fd)
        pipes = []  # the rest now belongs to `_communicate`
        stdout_fd, stderr_fd = proc.stdout.fileno(), proc.stderr.fileno()
        streams = _communicate(
            proc,
            writes={payload_w: payload},
            reads={
                stdout_fd: limits.max_output_bytes,
                stderr_fd: limits.max_output_bytes,
                result_r: _MAX_RESULT_BYTES,
                control_r: _MAX_RESULT_BYTES,
            },
            deadline=start + limits.timeout_s + _GRACE_S,
        )
        stdout, stdout_cut = streams[stdout_fd]
        stderr, stderr_cut = streams[stderr_fd]
        result = _score(
            tests,
            nonce,
            results=streams[result_r][0],
            control=streams[control_r][0],
            launcher_rc=proc.returncode,
        )
        result.stdout = stdout.decode("utf-8", "replace") + (_TRUNCATION_NOTE if stdout_cut else "")
        note = result.stderr  # why the sandbox ended early, if it did
        result.stderr = stderr.decode("utf-8", "replace") + (_TRUNCATION_NOTE if stderr_cut else "") + note
        result.isolation = mode + ("+uid" if uid is not None else "")
        result.duration_s = time.monotonic() - start
        return result
    finally:
        if proc is not None:
            if proc.poll() is None:  # only after an unexpected error
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        for fd in pipes:
            with contextlib.suppress(OSError):
                os.close(fd)
        _remove_tree(workdir)
        _release_uid(uid)


def _communicate(
    proc: subprocess.Popen, writes: dict[int, bytes], reads: dict[int, int], deadline: float
) -> dict[int, tuple[bytes, bool]]:
    """Feed `writes` and drain `reads` (keeping at most `reads[fd]` bytes each) until EOF or `deadline`.

    Owns and closes every fd given, except the launcher's stdout and stderr, which its `Popen` object closes.
    """
    received = {fd: bytearray() for fd in reads}
    truncated = dict.fromkeys(reads, False)
    offsets = dict.fromkeys(writes, 0)
    popen_fds = (proc.stdout.fileno(), proc.stderr.fileno())
    selector = selectors.DefaultSelector()

    def finish(fd: int) -> None:
        selector.unregister(fd)
        if fd not in popen_fds:
            os.close(fd)

    try:
        for fd in writes:
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_WRITE)
        for fd in reads:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                # The launcher should have killed everything by now; kill it and stop waiting for its pipes.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                break
            for key, _ in selector.select(min(remaining, 1.0)):
                fd = key.fd
                if fd in writes:
                    try:
                        offsets[fd] += os.write(fd, writes[fd][offsets[fd] : offsets[fd] + 65536])
                        if offsets[fd] >= len(writes[fd]):
                            finish(fd)
                    except BlockingIOError:
                        pass
                    except OSError:  # the sandbox closed its end
                        finish(fd)
                    continue
                data = os.read(fd, 65536)
                if not data:
                    finish(fd)
                    continue
                room = reads[fd] - len(received[fd])
                if len(data) > room:
                    truncated[fd] = True  # keep draining so the writer never blocks, but drop the excess
                received[fd] += data[: max(room, 0)]
    finally:
        for fd in list(selector.get_map()):
            finish(fd)
        selector.close()
    try:
        proc.wait(timeout=max(0.5, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return {fd: (bytes(received[fd]), truncated[fd]) for fd in reads}


def _score(tests: list[str], nonce: str, results: bytes, control: bytes, launcher_rc: int | None) -> ExecutionResult:
    outcomes: dict[int, bool] = {}
    program_error = done = False
    tag = nonce.encode()
    # Compared as bytes: the code can write arbitrary bytes to this pipe, and must not be able to crash the caller.
    for line in results.split(b"\n"):
        fields = line.split()
        if len(fields) < 2 or not secrets.compare_digest(fields[0], tag):
            continue  # not from the harness: ignored
        if fields[1] == b"done":
            done = True
        elif fields[1] == b"error":
            program_error = True
        elif len(fields) == 3 and fields[1].isdigit() and fields[2] in (b"pass", b"fail"):
            outcomes.setdefault(int(fields[1]), fields[2] == b"pass")
    events = []
    for line in control.decode("utf-8", "replace").splitlines():
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))
    exit_event = next((e for e in events if e.get("event") == "exit"), None)
    setup_errors = [e["message"] for e in events if e.get("event") == "error"]
    passed = sum(1 for i, ok in outcomes.items() if ok and 0 <= i < len(tests))
    if setup_errors or exit_event is None:
        reason = "; ".join(setup_errors) or f"the sandbox launcher exited with code {launcher_rc} without reporting"
        return ExecutionResult(0, len(tests), "sandbox_error", "", f"\n[sandbox error] {reason}\n", 0.0)
    note = ""
    if exit_event.get("timed_out"):
        status, note = "timeout", "the wall-clock limit was reached"
    elif program_error:
        status = "error"
    elif done and len(outcomes) == len(tests):
        status = "ok"
    elif exit_event.get("signal"):
        name = signal.Signals(exit_event["signal"]).name if exit_event["signal"] in signal.valid_signals() else "?"
        status, note = "killed", f"killed by signal {exit_event['signal']} ({name}) before reporting every test"
    else:
        status, note = "exited", f"exited with code {exit_event.get('returncode')} before reporting every test"
    return ExecutionResult(passed, len(tests), status, "", f"\n[sandbox] {note}\n" if note else "", 0.0)


def _remove_tree(path: str) -> None:
    def retry_writable(function, failed_path, _exc_info):
        # The code may have removed write permission from its own directories.
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(failed_path), 0o700)
            os.chmod(failed_path, 0o700)
            function(failed_path)

    shutil.rmtree(path, onerror=retry_writable)
    if os.path.lexists(path):
        logger.warning("Could not remove the sandbox directory %s.", path)


# --------------------------------------------------------------------------------------------------------------------
# Harness: runs inside the sandbox as `python -I -B -c _HARNESS <payload fd> <result fd>`
# --------------------------------------------------------------------------------------------------------------------

_HARNESS = r"""
def _ilr_harness():
    import builtins, json, os, sys, traceback

    # The solution runs in this interpreter and may replace anything reachable by name: `builtins.exec` with a no-op
    # would make every test "pass", `traceback.print_exception` with an exit would hide failures. So everything the
    # harness calls after the solution has started is bound here, before it starts.
    run, compile_code, numbered, catch_all = builtins.exec, builtins.compile, builtins.enumerate, BaseException
    exc_info, print_exception, getpid = sys.exc_info, traceback.print_exception, os.getpid
    payload_fd, result_fd = int(sys.argv[1]), int(sys.argv[2])
    chunks = []
    while True:
        chunk = os.read(payload_fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(payload_fd)
    job = json.loads(b"".join(chunks))
    sys.argv = [""]

    def make_report(write, fd, tag, owner):
        def report(message):
            # Only this process reports: a child the solution forks runs the rest of the harness too, and would
            # otherwise get to report tests it tried one guess at a time (quitting quietly whenever one failed).
            if getpid() != owner:
                return
            try:
                write(fd, (tag + " " + message + "\n").encode())
            except OSError:
                pass
        return report

    # Kept in a closure, not in this frame's locals, so that it is not one `f_locals` away from the solution.
    report = make_report(os.write, result_fd, job.pop("nonce"), getpid())
    del chunks, chunk

    def show_error(where):
        try:
            kind, value, tb = exc_info()
            sys.stderr.write("[" + where + "] ")
            # tb_next skips this harness's own frame.
            print_exception(kind, value, tb.tb_next if tb is not None else None, limit=8)
        except catch_all:
            pass

    namespace = {"__name__": "__solution__", "__builtins__": builtins}
    try:
        run(compile_code(job["setup"], "<setup>", "exec"), namespace)
        run(compile_code(job["program"], "<solution>", "exec"), namespace)
    except catch_all:
        show_error("solution")
        report("error")
        return
    for index, test in numbered(job["tests"]):
        try:
            run(compile_code(test, "<test %d>" % index, "exec"), namespace)
            outcome = "pass"
        except catch_all:
            show_error("test %d" % index)
            outcome = "fail"
        report("%d %s" % (index, outcome))
    report("done")


_ilr_harness()
try:
    import sys
    sys.stdout.flush()
    sys.stderr.flush()
finally:
    import os
    os._exit(0)  # skips atexit handlers and non-daemon threads left by the solution
"""


# --------------------------------------------------------------------------------------------------------------------
# Launcher: runs as `python -I -S sandbox.py --ilr-sandbox-launcher <config>`, single-threaded, stdlib only.
# --------------------------------------------------------------------------------------------------------------------

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUTS = 0x04000000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_MNT_DETACH = 2
_PR_SET_PDEATHSIG, _PR_SET_SECCOMP, _PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 1, 22, 36, 38
_SYS_MOUNT_SETATTR = 442  # the same on every architecture
_AT_FDCWD, _AT_RECURSIVE = -100, 0x8000
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID, _MOUNT_ATTR_NODEV = 1, 2, 4
# architecture: (pivot_root, socket, io_uring_setup, AUDIT_ARCH_*)
_SYSCALLS = {
    "x86_64": (155, 41, 425, 0xC000003E),
    "aarch64": (41, 198, 425, 0xC00000B7),
}
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_ETC_FILES = (
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/localtime",
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
)
_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")


class _MountAttr(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("attr_set", "attr_clr", "propagation", "userns_fd")]


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


class _Libc:
    def __init__(self) -> None:
        self.lib = ctypes.CDLL(None, use_errno=True)
        self.lib.syscall.restype = ctypes.c_long
        self.arch = os.uname().machine

    def check(self, ret: int, what: str) -> None:
        if ret != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"{what}: {os.strerror(code)}")

    def unshare(self, flags: int) -> None:
        self.check(self.lib.unshare(ctypes.c_int(flags)), "unshare")

    def mount(self, source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
        encode = lambda s: None if s is None else s.encode()  # noqa: E731
        ret = self.lib.mount(encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), encode(data))
        self.check(ret, f"mount {source} on {target}")

    def make_read_only(self, target: str) -> None:
        attr = _MountAttr(_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV, 0, 0, 0)
        ret = self.lib.syscall(
            ctypes.c_long(_SYS_MOUNT_SETATTR),
            ctypes.c_int(_AT_FDCWD),
            target.encode(),
            ctypes.c_uint(_AT_RECURSIVE),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        )
        if ret == 0:
            return
        # Before Linux 5.12: only the top mount becomes read-only; flags already locked on it must be kept.
        locked = os.statvfs(target).f_flag & (os.ST_NOEXEC | os.ST_NOATIME | os.ST_NODIRATIME | os.ST_RELATIME)
        self.mount(None, target, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV | locked)

    def pivot_root(self, new_root: str, put_old: str) -> None:
        if self.arch not in _SYSCALLS:
            raise OSError(errno.ENOSYS, "pivot_root: unknown system call number")
        ret = self.lib.syscall(ctypes.c_long(_SYSCALLS[self.arch][0]), new_root.encode(), put_old.encode())
        self.check(int(ret), "pivot_root")

    def prctl(self, option: int, arg: int = 0) -> None:
        zero = ctypes.c_ulong(0)
        self.check(self.lib.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), zero, zero, zero), f"prctl {option}")

    def install_seccomp(self) -> bool:
        """Refuse sockets other than Unix ones, and io_uring (which can open sockets without `socket()`)."""
        self.prctl(_PR_SET_NO_NEW_PRIVS, 1)  # also keeps setuid binaries from regaining privileges
        if self.arch not in _SYSCALLS:
            return False
        _, nr_socket, nr_io_uring_setup, audit_arch = _SYSCALLS[self.arch]
        load, jeq, jge, ja, ret = 0x20, 0x15, 0x35, 0x05, 0x06
        allow, deny, kill = 0x7FFF0000, 0x00050000 | errno.EACCES, 0x80000000
        x32_abi = (jge, 6, 0, 0x40000000) if self.arch == "x86_64" else (ja, 0, 0, 0)
        program = [
            (load, 0, 0, 4),  # 0: A = architecture
            (jeq, 0, 8, audit_arch),  # 1: another ABI (e.g. 32-bit int 0x80) -> 10 kill
            (load, 0, 0, 0),  # 2: A = system call number
            x32_abi,  # 3: x32 ABI -> 10 kill
            (jeq, 0, 2, nr_socket),  # 4: socket -> 5, else -> 7
            (load, 0, 0, 16),  # 5: A = low half of args[0], the address family
            (jeq, 1, 2, 1),  # 6: AF_UNIX -> 8 allow, else -> 9 deny
            (jeq, 1, 0, nr_io_uring_setup),  # 7: io_uring_setup -> 9 deny, else -> 8 allow
            (ret, 0, 0, allow),  # 8
            (ret, 0, 0, deny),  # 9
            (ret, 0, 0, kill),  # 10
        ]
        filters = (_SockFilter * len(program))(*[_SockFilter(*instruction) for instruction in program])
        fprog = _SockFprog(len(program), filters)
        zero = ctypes.c_ulong(0)
        ret_code = self.lib.prctl(ctypes.c_int(_PR_SET_SECCOMP), ctypes.c_ulong(2), ctypes.byref(fprog), zero, zero)
        self.check(ret_code, "seccomp")
        return True


def _under(path: str, parents: list[str] | tuple[str, ...]) -> bool:
    return any(path == parent or path.startswith(parent.rstrip("/") + "/") for parent in parents)


def _build_root(config: dict, libc: _Libc, owner: tuple[int, int]) -> None:
    """Make a fresh tmpfs root with read-only system and Python directories, pivot into it and enter the workdir."""
    workdir = config["workdir"]
    root = workdir  # the host directory is only a mount point here; mounts stay private to this namespace
    tmpfs = f"size={config['tmpfs_bytes']},nr_inodes=16384"
    libc.mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing below propagates back to the host
    libc.mount("tmpfs", root, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,nr_inodes=4096,mode=755")

    operations: list[tuple[str, str, str]] = [
        ("/tmp", "tmpfs", f"{tmpfs},mode=1777"),
        ("/dev/shm", "tmpfs", f"{tmpfs},mode=1777"),
        (workdir, "tmpfs", f"{tmpfs},mode=700,uid={owner[0]},gid={owner[1]}"),
        ("/proc", "proc", ""),
        ("/dev/fd", "link", "/proc/self/fd"),
        ("/dev/stdin", "link", "/proc/self/fd/0"),
        ("/dev/stdout", "link", "/proc/self/fd/1"),
        ("/dev/stderr", "link", "/proc/self/fd/2"),
    ]
    operations += [(device, "device", device) for device in _DEVICES if os.path.exists(device)]
    for path in (*_SYSTEM_DIRS, *_ETC_FILES):
        if os.path.islink(path):
            operations.append((path, "link", os.readlink(path)))
        elif os.path.exists(path):
            operations.append((path, "bind_ro", path))
    bound: list[str] = list(_SYSTEM_DIRS)
    for path in sorted(config["python_paths"], key=len):
        if path != "/" and os.path.isdir(path) and not _under(path, bound):
            operations.append((path, "bind_ro", os.path.realpath(path)))
            bound.append(path)

    # Parents before children, so that e.g. a venv under /tmp lands inside the private /tmp.
    for target, kind, source in sorted(operations, key=lambda op: op[0].rstrip("/").count("/")):
        inside = root + target
        if kind == "link":
            os.makedirs(os.path.dirname(inside), exist_ok=True)
            os.symlink(source, inside)
            continue
        if kind == "device" or (kind == "bind_ro" and not os.path.isdir(source)):
            os.makedirs(os.path.dirname(inside), exist_ok=True)
            with open(inside, "a"):
                pass
        else:
            os.makedirs(inside, exist_ok=True)
        if kind == "tmpfs":
            libc.mount("tmpfs", inside, "tmpfs", _MS_NOSUID | _MS_NODEV, source)
        elif kind == "proc":
            # Refused in some containers' user namespaces: the sandbox then has no /proc at all.
            with contextlib.suppress(OSError):
                libc.mount("proc", inside, "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
        elif kind == "device":
            libc.mount(source, inside, None, _MS_BIND)
        else:
            libc.mount(source, inside, None, _MS_BIND | _MS_REC)
            libc.make_read_only(inside)

    old = root + "/.old-root"
    os.mkdir(old)
    try:
        libc.pivot_root(root, old)
        os.chdir("/")
        libc.check(libc.lib.umount2(b"/.old-root", ctypes.c_int(_MNT_DETACH)), "umount old root")
        os.rmdir("/.old-root")
    except OSError:
        # pivot_root is refused when / is the initial ramfs; moving the new root over / and chroot-ing is the
        # fallback (unprivileged code cannot chroot back out).
        os.chdir(root)
        libc.mount(root, "/", None, 8192)  # MS_MOVE
        os.chroot(".")
        os.chdir("/")
    libc.mount(None, "/", None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
    os.chdir(workdir)


def _set_limits(config: dict) -> None:
    cpu = int(config["cpu_time_s"])
    for limit, soft, hard in (
        (resource.RLIMIT_AS, config["memory_bytes"], config["memory_bytes"]),
        # The soft limit sends SIGXCPU, which a PID namespace's init ignores; the hard one sends SIGKILL.
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_FSIZE, config["file_size_bytes"], config["file_size_bytes"]),
        (resource.RLIMIT_NPROC, config["max_processes"], config["max_processes"]),
        (resource.RLIMIT_NOFILE, 256, 256),
        (resource.RLIMIT_CORE, 0, 0),
    ):
        resource.setrlimit(limit, (soft, hard))


def _sandbox_child(config: dict, libc: _Libc, launcher_pid: int, owner: tuple[int, int]) -> None:
    """In the forked child: isolate, limit, drop privileges and exec the harness. Never returns."""
    os.setsid()  # its own process group, killed as a whole afterwards
    if config["mode"] == "namespace":
        _build_root(config, libc, owner)
    else:
        os.chdir(config["workdir"])
    _set_limits(config)
    uid = config["uid"]
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    # After the uid change, which clears it. A namespace's init sees its parent as pid 0, so only check otherwise.
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if config["mode"] != "namespace" and os.getppid() != launcher_pid:
        os._exit(1)
    libc.install_seccomp()
    python = config["python"]
    argv = [python, "-I", "-B", "-c", config["harness"], str(config["payload_fd"]), str(config["result_fd"])]
    os.execve(python, argv, config["env"])


def _children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(child) for child in f.read().split()]
    except OSError:
        pass
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    children.append(int(entry))
    return children


def _wait_for_exit(pid: int, timeout_s: float, stop_fd: int) -> bool:
    """Wait until `pid` exits, without reaping it (its pid and process group stay reserved), or until `stop_fd` is
    readable. True on timeout."""
    deadline = time.monotonic() + timeout_s
    pidfd = None
    with contextlib.suppress(AttributeError, OSError):
        pidfd = os.pidfd_open(pid)
    try:
        while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            watched = [stop_fd] if pidfd is None else [stop_fd, pidfd]
            if stop_fd in select.select(watched, [], [], remaining if pidfd is not None else min(remaining, 0.005))[0]:
                return False
        return False
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _kill_tree(pid: int) -> int:
    """Kill the sandbox `pid` (not yet reaped), its process group and every orphan reparented to us; reap them all.

    Returns the sandbox's wait status.
    """
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)  # a namespace's init: the kernel then kills everything in the namespace
    for _ in range(2):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)  # safe: the unreaped leader keeps the group id from being reused
    status = os.waitpid(pid, 0)[1]
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        # Processes that left the group (setsid, double fork) were reparented to us, the child subreaper.
        for child in _children_of(os.getpid()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            break  # nothing left
        time.sleep(0.002)
    return status


def _launcher_main(config_json: str) -> None:
    config = json.loads(config_json)
    control_fd = config["control_fd"]
    os.set_inheritable(control_fd, False)  # closed at the harness's exec: the sandbox cannot forge events

    def emit(event: dict) -> None:
        with contextlib.suppress(OSError):
            os.write(control_fd, (json.dumps(event) + "\n").encode())

    # When the caller dies, however it dies, the kernel sends us SIGTERM: we stop waiting and kill the sandbox's whole
    # tree as after a timeout, so that nothing it started outlives the caller, not even processes that left its group
    # (process mode). The handler only wakes the wait through `stop_r`; it never interrupts the killing.
    stop_r, stop_w = os.pipe()
    os.set_blocking(stop_w, False)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    signal.set_wakeup_fd(stop_w)
    libc = _Libc()
    try:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)  # checked below in case the caller died first
        if os.getppid() != config["parent_pid"]:
            os._exit(1)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1)  # orphans of the sandbox become our children, so we can kill them
        owner = (config["uid"], config["uid"]) if config["uid"] is not None else (os.getuid(), os.getgid())
        if config["mode"] == "namespace":
            flags = _CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWNET | _CLONE_NEWIPC | _CLONE_NEWUTS
            if os.geteuid() != 0:
                flags |= _CLONE_NEWUSER
            libc.unshare(flags)
            if flags & _CLONE_NEWUSER:
                # Identity map: the code keeps the caller's uid, and loses the namespace's capabilities at exec.
                for name, content in (
                    ("setgroups", "deny"),
                    ("uid_map", f"{owner[0]} {owner[0]} 1"),
                    ("gid_map", f"{owner[1]} {owner[1]} 1"),
                ):
                    with open(f"/proc/self/{name}", "w") as f:
                        f.write(content)
        launcher_pid = os.getpid()
        pid = os.fork()
    except OSError as exc:
        emit({"event": "error", "message": f"{config['mode']} isolation: {exc}"})
        os._exit(0)
    if pid == 0:
        try:
            _sandbox_child(config, libc, launcher_pid, owner)
        except BaseException as exc:
            emit({"event": "error", "message": f"{config['mode']} isolation: {type(exc).__name__}: {exc}"})
        os._exit(127)
    # Our copies would keep the pipes open after the sandbox is gone.
    os.close(config["payload_fd"])
    os.close(config["result_fd"])
    timed_out = _wait_for_exit(pid, config["timeout_s"], stop_r)
    code = os.waitstatus_to_exitcode(_kill_tree(pid))
    emit({"event": "exit", "timed_out": timed_out, "returncode": max(code, 0), "signal": max(-code, 0)})
    os._exit(0)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == _LAUNCHER_FLAG:
    _launcher_main(sys.argv[2])

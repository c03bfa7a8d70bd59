"""Adversarial tests for `ilr.sandbox`: programs that try to outlive, escape, exhaust or cheat the sandbox.

Each test runs a hostile program through the public API (`run_tests`, `run_tests_batch`) in real subprocesses and
checks two things: how the program is scored (a cheat is never counted as a pass), and the effect on the host (no
process left behind, no file written, no secret read).

Every program marks what it leaves behind with `TOKEN`, unique to this run: processes carry it in their command line
or their name (`/proc/<pid>/comm`, at most 15 characters), files in their name. The module-level fixture
`_host_unchanged` then checks, after the whole suite, that no process with the token is left and that no file with
the token, or owned by a sandbox uid, appeared in the repository, `$HOME` or `/tmp`. Other agents run tests on this
machine at the same time, so the checks only ever look at what carries the token or a sandbox uid.

Safety on a shared machine: an attack that would hurt the host if the sandbox failed (`kill(-1, SIGKILL)`, writing
into the repository or `$HOME`, filling a disk) runs only where the sandbox claims to contain it
(`_contains_hostile_code`: not as root without a uid drop, the documented weak case), and every background process a
program starts ends by itself after `_LIFETIME_S` seconds even if it escapes (and `_left_behind` kills any it finds).
"""

import contextlib
import errno
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from ilr import sandbox
from ilr.sandbox import ALLOW_ENV_VAR, ExecutionResult, SandboxLimits, run_tests, run_tests_batch


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")

# `secrets`, not `random`, which conftest seeds identically in every run. 12 characters, so that a two-character
# case suffix still fits in a process name (15 characters).
TOKEN = "ilrx" + secrets.token_hex(4)
REPO = Path(__file__).resolve().parents[1]
HOME = Path.home()
TMP = Path(tempfile.gettempdir())
FAST = SandboxLimits(timeout_s=10.0)
_LIFETIME_S = 90  # background processes a program starts exit by themselves after this, escaped or not


# --- host checks -----------------------------------------------------------------------------------------------------


def _marked_processes(marker: str = TOKEN) -> dict[int, str]:
    """pid -> command line of every process on the machine whose command line or name contains `marker`."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if marker in cmdline or marker in comm:
            found[int(entry)] = f"[{comm}] {cmdline}"
    return found


def _left_behind(marker: str, wait_s: float = 3.0) -> dict[int, str]:
    """Processes with `marker` still alive after `wait_s` (the kernel may take a moment to reap killed ones)."""
    deadline = time.monotonic() + wait_s
    while (left := _marked_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in left:  # clean up after a failure, so that one escape does not break the next tests
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return left


def _sandbox_uid(uid: int) -> bool:
    base = int(os.environ.get(sandbox.UID_BASE_ENV_VAR, sandbox._DEFAULT_UID_BASE))
    return base <= uid < base + sandbox._UID_SPAN


_PRUNED = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache"}


def _host_snapshot() -> dict[str, tuple[int, int, int]]:
    """path -> (mtime, size, owner) for the repository tree and the top level of `$HOME` and `/tmp`."""
    snapshot = {}

    def add(path: str) -> None:
        try:
            st = os.lstat(path)
        except OSError:
            return
        snapshot[path] = (st.st_mtime_ns, st.st_size, st.st_uid)

    for top in (HOME, TMP):
        add(str(top))
        for entry in os.scandir(top):
            # pytest's own temporary directories and the sandboxes' work directories (this run's and other agents')
            # change all the time; what the sandbox must not do there is caught by the token and the owner below.
            if not entry.name.startswith(("pytest-of-", "ilr-sandbox-")):
                add(entry.path)
    for dirpath, dirnames, filenames in os.walk(REPO):
        dirnames[:] = [name for name in dirnames if name not in _PRUNED]
        for name in (*dirnames, *filenames):
            add(os.path.join(dirpath, name))
    return snapshot


@pytest.fixture(scope="module", autouse=True)
def _host_unchanged():
    """After the whole module: no process with the token is left, and no file outside the temp dirs was written."""
    before = _host_snapshot()
    yield
    left = _left_behind(TOKEN)
    after = _host_snapshot()
    changed = {path for path, info in after.items() if before.get(path) != info}
    # Other agents edit the tree concurrently, so only changes that can be the sandbox's count: a path with the token
    # (every program's file names carry it) or a file owned by a sandbox uid (namespace mode runs code under one).
    written = sorted(path for path in changed if TOKEN in path or _sandbox_uid(after[path][2]))
    written += sorted(str(path) for path in (REPO, HOME, TMP) for path in path.glob(f"*{TOKEN}*"))
    assert not left, f"processes outlived the sandbox: {left}"
    assert not written, f"files written outside the sandbox: {written}"


@pytest.fixture(autouse=True)
def _allow_execution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ALLOW_ENV_VAR, "1")


def _contains_hostile_code(isolation: str) -> bool:
    # Only root without a uid drop lacks containment (documented); every other mode must contain everything.
    return os.geteuid() != 0 or isolation.endswith("+uid")


def _require_containment(isolation: str) -> None:
    if not _contains_hostile_code(isolation):
        pytest.skip(f"{isolation!r} as root does not contain this (documented); not running it on a shared machine")


def _program(source: str, marker: str = "") -> str:
    """The prelude (marking helpers) and `source`, with `@MARKER@` replaced by `marker`."""
    return (_PRELUDE + textwrap.dedent(source)).replace("@MARKER@", marker)


# Helpers every program gets. `marker` names a process (comm) or is its last argument (cmdline).
_PRELUDE = f"""
import ctypes, os, signal, subprocess, sys, threading, time

LIFETIME = {_LIFETIME_S}


def name_process(marker):
    ctypes.CDLL(None).prctl(15, marker.encode(), 0, 0, 0)  # PR_SET_NAME: shows in /proc/<pid>/comm


def sleeper(marker):
    # A fresh interpreter with the marker in its command line; it ends by itself after LIFETIME seconds.
    return [sys.executable, "-S", "-c", "import time; time.sleep(%d)" % LIFETIME, marker]


def running(marker, timeout=5.0):
    # Whether another process with the marker runs, as seen from inside the sandbox.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                with open("/proc/%s/cmdline" % pid, "rb") as f:
                    cmdline = f.read()
                with open("/proc/%s/comm" % pid, "rb") as f:
                    comm = f.read()
            except OSError:
                continue
            if marker.encode() in cmdline or marker.encode() in comm:
                return True
        time.sleep(0.01)
    return False

"""


# --- outliving the sandbox -------------------------------------------------------------------------------------------

# Each program starts a process meant to survive the sandbox, marked with @MARKER@, and sets RUNNING once it runs.
_OUTLIVE_PROGRAMS = {
    "double_fork_setsid": """
        pid = os.fork()
        if pid == 0:
            os.setsid()  # leaves the process group
            if os.fork() == 0:
                os.execv(sys.executable, sleeper("@MARKER@"))  # reparented once its parent exits
            os._exit(0)
        os.waitpid(pid, 0)
        RUNNING = running("@MARKER@")
    """,
    "popen_new_session": """
        subprocess.Popen(sleeper("@MARKER@"), start_new_session=True, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        RUNNING = running("@MARKER@")
    """,
    "nohup": """
        subprocess.Popen(["nohup", *sleeper("@MARKER@")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN), start_new_session=True)
        RUNNING = running("@MARKER@")
    """,
    # The thread starts its process while the tests run, after the solution has returned.
    "daemon_thread": """
        def spawn_later():
            time.sleep(0.2)
            subprocess.Popen(sleeper("@MARKER@"), start_new_session=True)
            time.sleep(LIFETIME)
        threading.Thread(target=spawn_later, daemon=True).start()
        RUNNING = None
    """,
    "sigterm_immune_child": """
        if os.fork() == 0:
            try:
                name_process("@MARKER@")
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1):
                    signal.signal(sig, signal.SIG_IGN)
                signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
                os.setsid()
                deadline = time.monotonic() + LIFETIME
                while time.monotonic() < deadline:
                    time.sleep(0.05)
            finally:
                os._exit(0)
        RUNNING = running("@MARKER@")
    """,
    "stopped_child": """
        if os.fork() == 0:
            try:
                name_process("@MARKER@")
                os.setsid()
                os.kill(os.getpid(), signal.SIGSTOP)  # a stopped process ignores everything but SIGKILL/SIGCONT
            finally:
                os._exit(0)
        RUNNING = running("@MARKER@")
    """,
    "ctypes_fork": """
        libc = ctypes.CDLL(None)
        if libc.fork() == 0:  # a raw fork(): none of Python's at-fork handlers run
            name_process("@MARKER@")
            libc.setsid()
            libc.sleep(LIFETIME)
            libc._exit(0)
        RUNNING = running("@MARKER@")
    """,
    # A lineage that never stays in one process: each generation leaves the session, forks and exits.
    "fork_walker": """
        if os.fork() == 0:
            try:
                name_process("@MARKER@")
                deadline = time.monotonic() + LIFETIME
                while time.monotonic() < deadline:
                    time.sleep(0.005)
                    try:
                        os.setsid()
                    except OSError:
                        pass
                    try:
                        if os.fork() != 0:
                            os._exit(0)
                    except OSError:  # out of processes (RLIMIT_NPROC): keep the current one alive
                        time.sleep(0.05)
            finally:
                os._exit(0)
        RUNNING = running("@MARKER@")
        time.sleep(0.3)  # let it walk
    """,
}


@pytest.mark.parametrize("case", list(_OUTLIVE_PROGRAMS))
def test_background_processes_do_not_outlive_the_sandbox(case: str, isolation: str):
    marker = f"{TOKEN}{list(_OUTLIVE_PROGRAMS).index(case):02d}"
    tests = ['assert RUNNING or running("@MARKER@"), "the background process never ran: the test proves nothing"']
    if case == "daemon_thread":
        tests.append("time.sleep(0.5)")  # the thread is still alive, inside the sandbox, when the tests end
    result = run_tests(_program(_OUTLIVE_PROGRAMS[case], marker), [t.replace("@MARKER@", marker) for t in tests])
    assert result.status == "ok" and result.passed == len(tests), result.stderr
    assert not _left_behind(marker), f"{case}: a process outlived the sandbox ({result.isolation})"


@pytest.mark.parametrize("where", ["solution", "test"])
def test_a_loop_that_ignores_sigterm_is_killed_at_the_timeout(where: str, isolation: str):
    marker = f"{TOKEN}lp"
    spin = """
        name_process("@MARKER@")  # the harness itself
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGALRM, signal.SIGXCPU):
            signal.signal(sig, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        while True:
            pass
    """
    if where == "solution":
        program, tests, reported = _program(spin, marker), ["assert True", "assert True"], 0
    else:
        program = _program("def spin():\n" + textwrap.indent(textwrap.dedent(spin), "    "), marker)
        tests, reported = ["assert True", "spin()", "assert True"], 1  # the test before the loop still counts
    start = time.monotonic()
    result = run_tests(program, tests, limits=SandboxLimits(timeout_s=1.0))
    assert (result.status, result.passed) == ("timeout", reported), result.stderr
    assert time.monotonic() - start < 5.0
    assert not _left_behind(marker)


def test_many_threads_are_capped(isolation: str):
    limits = SandboxLimits(timeout_s=10.0, max_processes=16)
    program = _program("""
        threading.stack_size(64 * 1024)  # small stacks, so that only the process limit can stop them
        stop = threading.Event()
        STARTED = 0
        for _ in range(400):
            try:
                threading.Thread(target=stop.wait, daemon=True).start()
            except RuntimeError:  # can't start new thread
                break
            STARTED += 1
        print("STARTED", STARTED)
    """)
    result = run_tests(program, ["assert True", "assert STARTED >= 400"], limits=limits)
    assert result.status == "ok", result.stderr
    started = int(result.stdout.split()[-1])
    assert started > 0
    if _contains_hostile_code(result.isolation):
        # RLIMIT_NPROC counts threads; root is exempt from it, hence only under a dropped uid.
        assert started < limits.max_processes
        assert result.passed == 1


# --- ctypes: the C library directly -----------------------------------------------------------------------------------


def test_raw_socket_syscalls_are_refused(isolation: str):
    if os.uname().machine not in sandbox._SYSCALLS:
        pytest.skip("the seccomp filter only knows x86-64 and aarch64")
    nr_socket, nr_io_uring_setup = sandbox._SYSCALLS[os.uname().machine][1:3]
    program = _program(f"""
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        OPENED = 0
        # AF_UNIX (allowed: the probe works), then AF_INET, AF_INET6, AF_NETLINK, AF_PACKET, all SOCK_DGRAM
        for family in (1, 2, 10, 16, 17):
            fd = libc.syscall(ctypes.c_long({nr_socket}), ctypes.c_long(family), ctypes.c_long(2), ctypes.c_long(0))
            print("socket", family, fd, ctypes.get_errno() if fd < 0 else 0)
            OPENED += family != 1 and fd >= 0
        params = ctypes.create_string_buffer(256)  # struct io_uring_params, zeroed
        fd = libc.syscall(ctypes.c_long({nr_io_uring_setup}), ctypes.c_long(8), params)
        print("io_uring", fd, ctypes.get_errno() if fd < 0 else 0)
        OPENED += fd >= 0
    """)
    result = run_tests(program, ["assert OPENED > 0"], limits=FAST)
    assert (result.status, result.passed) == ("ok", 0), result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["socket", "1"] and int(lines[0].split()[2]) >= 0, "AF_UNIX must work"
    for line in lines[1:]:
        assert line.split()[-2:] == ["-1", str(errno.EACCES)], f"not refused by seccomp: {line}"


def test_ctypes_kill_all_cannot_reach_the_host(isolation: str):
    _require_containment(isolation)
    canary_marker = f"ilrcanary{secrets.token_hex(4)}"
    canary = subprocess.Popen([sys.executable, "-S", "-c", "import time; time.sleep(60)", canary_marker])
    marker = f"{TOKEN}kl"
    program = _program(
        """
        children = [subprocess.Popen(sleeper("@MARKER@")) for _ in range(2)]
        assert running("@MARKER@")
        # kill(-1, SIGKILL): every process this uid may signal. Guarded in the program too: as root it would be
        # every process on the machine, should the sandbox ever run it as root by mistake.
        if os.getuid() != 0:
            print("kill(-1)", ctypes.CDLL(None).kill(-1, 9))
        time.sleep(0.2)
        print("children", [child.poll() for child in children])
    """,
        marker,
    )
    try:
        result = run_tests(program, ["assert True"], limits=FAST)
        assert (result.status, result.passed) == ("ok", 1), result.stderr
        assert "kill(-1) 0" in result.stdout and "children [-9, -9]" in result.stdout, result.stdout
        assert canary.poll() is None, "the sandbox killed a process outside it"
    finally:
        canary.kill()
        canary.wait()
    assert not _left_behind(marker)


# --- writing outside the sandbox -------------------------------------------------------------------------------------


def test_writes_to_the_repo_home_and_tmp_do_not_reach_the_host(isolation: str, tmp_path: Path):
    _require_containment(isolation)
    canary = tmp_path / "canary.txt"
    canary.write_text("original")
    canary.chmod(0o666)  # writable by anyone who can reach it
    # key -> (the path the program writes, where that would land on the host)
    targets = {
        "repo": (REPO / f"PWNED-{TOKEN}",) * 2,
        "package": (REPO / "src" / "ilr" / f"pwned_{TOKEN}.py",) * 2,  # would be importable: a supply-chain attack
        "home": (HOME / f"pwned-{TOKEN}",) * 2,
        "home_nested": (HOME / ".config" / f"pwned-{TOKEN}",) * 2,
        "proc_root": (Path(f"/proc/1/root{REPO}/PWNED-proc-{TOKEN}"), REPO / f"PWNED-proc-{TOKEN}"),
        "tmp": (TMP / f"pwned-{TOKEN}",) * 2,
        "shm": (Path("/dev/shm") / f"pwned-{TOKEN}",) * 2,
        # Relative to the work directory, which is under /tmp on the host.
        "workdir_parent": (Path(f"../pwned-rel-{TOKEN}"), TMP / f"pwned-rel-{TOKEN}"),
    }
    writes = "".join(
        f"""
try:
    with open({str(path)!r}, "w") as f:
        f.write("escaped")
    print("{key} WROTE")
except OSError as exc:
    print("{key} BLOCKED", exc.errno)
"""
        for key, (path, _) in targets.items()
    )
    program = _program(
        writes
        + f"""
for key, path, mode in (("canary", {str(canary)!r}, "w"), ("existing", {str(REPO / "pyproject.toml")!r}, "r+")):
    try:
        open(path, mode).close()  # "w" truncates the canary; "r+" opens a repository file without writing
        print(key, "OPENED")
    except OSError as exc:
        print(key, "BLOCKED", exc.errno)
"""
    )
    try:
        result = run_tests(program, ["assert True"], limits=FAST)
        assert result.status == "ok", result.stderr
        for key, (_, host_path) in targets.items():
            assert f"{key} " in result.stdout, f"{key}: the attempt was not made"
            assert not host_path.exists(), f"the sandbox wrote {host_path}"
        assert canary.read_text() == "original"
        for key in ("repo", "package", "home", "home_nested", "proc_root", "canary", "existing"):
            assert f"{key} BLOCKED" in result.stdout, f"{key}: {result.stdout}"
        if result.isolation.startswith("namespace"):
            # A private tmpfs: the write "succeeds" in there and vanishes with the sandbox.
            assert "tmp WROTE" in result.stdout and "shm WROTE" in result.stdout
    finally:
        for _, host_path in targets.values():
            host_path.unlink(missing_ok=True)


# --- reading secrets -------------------------------------------------------------------------------------------------

# Runs one sandbox from a process that has the secret in its *initial* environment (which /proc/<pid>/environ shows;
# `monkeypatch.setenv` in this process would not), reading the program on stdin.
_SECRET_HOLDER = """
import dataclasses, json, sys
from ilr.sandbox import SandboxLimits, run_tests
result = run_tests(sys.stdin.read(), ["assert FOUND"], limits=SandboxLimits(timeout_s=10.0))
print(json.dumps(dataclasses.asdict(result)))
"""


def test_other_processes_environments_are_unreadable(isolation: str):
    secret = f"hunter2-{secrets.token_hex(16)}"
    program = _program("""
        print("OWN ENVIRONMENT", sorted(os.environ))
        FOUND = []
        readable = 0
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            for name in ("environ", "cmdline"):
                try:
                    with open("/proc/%s/%s" % (pid, name), "rb") as f:
                        content = f.read()
                except OSError:
                    continue
                readable += name == "environ"
                for entry in content.split(b"\\0"):
                    if entry.startswith(b"ILR_TEST_SECRET="):
                        FOUND.append(entry.decode(errors="replace"))
        print("OTHER ENVIRONS READABLE", readable)
        print("FOUND", FOUND)
    """)
    mode = isolation.split("+")[0]
    env = {**os.environ, "ILR_TEST_SECRET": secret, ALLOW_ENV_VAR: "1", sandbox.ISOLATION_ENV_VAR: mode}
    holder = subprocess.run(
        [sys.executable, "-c", _SECRET_HOLDER], input=program, env=env, capture_output=True, text=True, timeout=60
    )
    assert holder.returncode == 0, holder.stderr
    result = ExecutionResult(**json.loads(holder.stdout.strip().splitlines()[-1]))
    assert result.status == "ok" and "OTHER ENVIRONS READABLE" in result.stdout, result.stderr
    own_environment = next(line for line in result.stdout.splitlines() if line.startswith("OWN ENVIRONMENT"))
    assert "'PATH'" in own_environment and "ILR_TEST_SECRET" not in own_environment
    if not _contains_hostile_code(result.isolation):
        # Here the probe does find the secret in the holder's /proc/<pid>/environ, which shows that it works.
        pytest.skip(f"{result.isolation!r} as root can read /proc/<pid>/environ (documented)")
    assert secret not in result.stdout + result.stderr and "ILR_TEST_SECRET" not in result.stdout + result.stderr
    assert (result.passed, result.fraction) == (0, 0.0)
    if mode == "namespace":
        assert "OTHER ENVIRONS READABLE 0" in result.stdout  # /proc shows only the sandbox


# --- exhausting resources --------------------------------------------------------------------------------------------


def test_file_descriptor_exhaustion_leaves_the_harness_working(isolation: str):
    program = _program("""
        import resource
        if os.getuid() != 0:  # root could raise its own limit; only an unprivileged raise is expected to fail
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (1 << 20, 1 << 20))
                print("RAISED")
            except (ValueError, OSError):
                pass
        OPENED = []
        while True:
            try:
                OPENED.append(os.open("/dev/null", os.O_RDONLY))
            except OSError as exc:
                print("STOPPED", exc.errno, len(OPENED))
                break
    """)
    result = run_tests(program, ["assert len(OPENED) > 100_000", "assert True"], limits=FAST)
    assert (result.status, result.passed) == ("ok", 1), result.stderr
    assert "RAISED" not in result.stdout
    stopped, code, opened = result.stdout.split()[-3:]
    assert stopped == "STOPPED" and int(code) == errno.EMFILE and int(opened) < 256
    assert "<test 0>" in result.stderr  # the failing test's traceback still got out


@pytest.mark.parametrize(
    "max_file_size_mb", [2, pytest.param(16, marks=pytest.mark.slow)], ids=["small", "default_size"]
)
def test_disk_exhaustion_stays_in_the_private_tmpfs(max_file_size_mb: int):
    # Only in namespace mode: in process mode the work directory is on the host disk (documented).
    if not run_tests("pass", ["assert True"], limits=FAST).isolation.startswith("namespace"):
        pytest.skip("needs namespace isolation (process mode writes to the host disk)")
    program = _program("""
        import errno
        WRITTEN = {}
        for place in (".", "/tmp", "/dev/shm"):
            WRITTEN[place] = 0
            index = 0
            try:
                while True:
                    path = os.path.join(place, "fill-%d" % index)
                    index += 1
                    try:
                        with open(path, "wb") as f:
                            while True:
                                f.write(b"x" * (1 << 20))
                                f.flush()
                                WRITTEN[place] += 1 << 20
                    except OSError as exc:
                        if exc.errno != errno.EFBIG:  # RLIMIT_FSIZE ends one file; anything else the place
                            raise
            except OSError as exc:
                print("FULL", place, WRITTEN[place], errno.errorcode[exc.errno])
    """)
    limits = SandboxLimits(timeout_s=30.0, max_file_size_mb=max_file_size_mb)
    result = run_tests(program, ["assert True", "assert sum(WRITTEN.values()) > 1 << 40"], limits=limits)
    assert (result.status, result.passed) == ("ok", 1), result.stderr
    tmpfs_bytes = 4 * max_file_size_mb << 20
    full = [line.split() for line in result.stdout.splitlines() if line.startswith("FULL")]
    assert [place for _, place, _, _ in full] == [".", "/tmp", "/dev/shm"]
    # ENOSPC after at most the tmpfs size: every place is a private tmpfs, not the host disk (which has room left).
    for _, place, written, code in full:
        assert code == "ENOSPC" and tmpfs_bytes // 2 <= int(written) <= tmpfs_bytes, (place, written, code)


def test_memory_exhaustion_is_contained(isolation: str):
    limits = SandboxLimits(timeout_s=10.0, memory_mb=256)
    program = _program("""
        import mmap
        HELD = []
        try:
            while True:
                HELD.append(bytearray(16 << 20))
        except MemoryError:
            pass
        total = sum(map(len, HELD))
        HELD.clear()
        try:
            mmap.mmap(-1, 1 << 30)
            print("MAPPED")
        except OSError:
            pass
        print("ALLOCATED", total)
    """)
    result = run_tests(program, ["assert True", "assert False, 'the solution survived'"], limits=limits)
    assert (result.status, result.passed) == ("ok", 1), result.stderr
    assert "MAPPED" not in result.stdout
    assert 0 < int(result.stdout.split()[-1]) < limits.memory_mb << 20


# --- cheating the score ----------------------------------------------------------------------------------------------

# Tests no honest-but-wrong solution passes; every cheat below comes with `def f(x): return 0`.
_TESTS = ["assert f(3) == 7", "assert f(5) == 11", "assert f(10) == 21"]

_CHEATS = {
    # The project's own modules, where importable: make the parent "see" passes.
    "import_ilr": """
        IMPORTED = []
        for module in ("ilr.sandbox", "ilr.rewards"):
            try:
                __import__(module)
                IMPORTED.append(module)
            except Exception as exc:
                print(module, type(exc).__name__)
        if "ilr.sandbox" in IMPORTED:
            import ilr.sandbox
            ilr.sandbox._score = lambda tests, *a, **k: ilr.sandbox.ExecutionResult(len(tests), len(tests), "ok", "", "", 0.0)
            ilr.sandbox.ExecutionResult.fraction = property(lambda self: 1.0)
        if "ilr.rewards" in IMPORTED:
            import ilr.rewards
            ilr.rewards.code_reward = lambda completions, **k: [1.0] * len(completions)
        print("IMPORTED", IMPORTED)
        def f(x):
            return 0
    """,
    # Lookalike result lines on stdout, stderr and the result pipe (its fd is in the harness's command line).
    "fake_markers": """
        print("PASS\\n0 pass\\n1 pass\\n2 pass\\ndone\\nALL TESTS PASSED")
        sys.stderr.write("0 pass\\ndone\\n")
        with open("/proc/self/cmdline", "rb") as f:
            result_fd = int(f.read().split(b"\\0")[-2])
        for guess in ("", "0" * 32, "f" * 32, "nonce", os.urandom(16).hex()):
            for line in ("0 pass", "1 pass", "2 pass", "done"):
                os.write(result_fd, ((guess + " " + line).strip() + "\\n").encode())
        def f(x):
            return 0
    """,
    "exit_early": """
        import os
        def f(x):
            return 0
        os._exit(0)
    """,
    "sys_exit_in_solution": """
        def f(x):
            return 0
        sys.exit(0)
    """,
    "keyboard_interrupt_in_solution": """
        def f(x):
            return 0
        raise KeyboardInterrupt
    """,
    # Called by the tests: leave the test early without an exception from the assert.
    "sys_exit_in_test": """
        def f(x):
            sys.exit(0)
    """,
    "os_exit_in_test": """
        def f(x):
            os._exit(0)
    """,
    # Close the result pipe, or put /dev/null in its place.
    "redirect_result_pipe": """
        with open("/proc/self/cmdline", "rb") as f:
            result_fd = int(f.read().split(b"\\0")[-2])
        os.dup2(os.open("/dev/null", os.O_WRONLY), result_fd)
        def f(x):
            return 0
    """,
    # Monkeypatch what the harness calls after the solution: `exec` that runs nothing, `enumerate` that hands out
    # tests that always pass.
    "patch_builtins_exec": """
        import builtins
        builtins.exec = lambda *args, **kwargs: None
        def f(x):
            return 0
    """,
    "patch_builtins_enumerate": """
        import builtins
        builtins.enumerate = lambda tests: iter([(i, "pass") for i in range(len(tests))])
        def f(x):
            return 0
    """,
    # A guessing oracle: fork one child per candidate answer; a child whose test fails dies quietly (the harness's
    # traceback printer is replaced by an exit) instead of reporting the failure, and the first child whose test
    # passes goes on to report it, and to guess the next test the same way.
    "fork_oracle": """
        import traceback
        def die_quietly(*args, **kwargs):
            os._exit(1)
        traceback.print_exception = die_quietly
        def f(x):
            for guess in range(-25, 25):
                pid = os.fork()
                if pid == 0:
                    return guess
                _, status = os.waitpid(pid, 0)
                if os.waitstatus_to_exitcode(status) == 0:
                    os._exit(0)
            os._exit(1)
    """,
}


@pytest.mark.parametrize("case", list(_CHEATS))
def test_cheats_never_count_as_passes(case: str, isolation: str):
    original_score = sandbox._score
    result = run_tests(_program(_CHEATS[case]), _TESTS, limits=FAST)
    assert result.passed == 0 and result.fraction == 0.0, f"{case} scored {result.passed}/{result.total}: {result}"
    assert result.total == len(_TESTS)
    # Scored as the model's failure, never as an infrastructure error (which the code reward turns into `None`).
    assert result.status != "sandbox_error", result.stderr
    assert sandbox._score is original_score and ExecutionResult.fraction.fget(result) == 0.0
    if case == "import_ilr" and result.isolation.startswith("namespace"):
        assert "IMPORTED []" in result.stdout  # the project's source is not even visible in the sandbox


def test_killing_the_launcher_is_not_an_infrastructure_error(isolation: str):
    # Root without a uid drop can kill its launcher (documented): the run then reads as a `sandbox_error`.
    _require_containment(isolation)
    program = _program("""
        for pid in (os.getppid(), os.getpgid(0) and -os.getpgid(0)):
            try:
                if pid not in (0, 1, -1):
                    os.kill(pid, signal.SIGKILL)
            except OSError as exc:
                print("kill", pid, type(exc).__name__)
        def f(x):
            return 0
    """)
    result = run_tests(program, _TESTS, limits=FAST)
    assert result.passed == 0 and result.status != "sandbox_error", result.stderr


def test_a_batch_attacker_cannot_touch_its_neighbours(isolation: str):
    _require_containment(isolation)
    honest = "import time\nwith open('answer.txt', 'w') as f:\n    f.write('42')\ntime.sleep(0.8)\n"
    honest_tests = ["assert open('answer.txt').read() == '42'"]
    # Looks for the other sandboxes' work directories (they share the host's /tmp in process mode) and vandalises them.
    attacker = _program("""
        import glob, shutil
        time.sleep(0.3)
        for workdir in glob.glob("/tmp/ilr-sandbox-*"):
            if workdir != os.getcwd():
                print("FOUND", workdir)
                shutil.rmtree(workdir, ignore_errors=True)
                try:
                    with open(os.path.join(workdir, "answer.txt"), "w") as f:
                        f.write("0")
                except OSError:
                    pass
        def f(x):
            return 0
    """)
    jobs = [(honest, honest_tests, ""), (attacker, _TESTS, ""), (honest, honest_tests, "")]
    results = run_tests_batch(jobs, limits=FAST, max_workers=3)
    assert [(r.status, r.passed) for r in results] == [("ok", 1), ("ok", 0), ("ok", 1)], [r.stderr for r in results]

"""Tests for `ilr.sandbox`: scoring, the opt-in gate, and containment of hostile code.

Containment tests check the effect on the host (processes left, files written, connections received, memory used),
not only the reported status. Process checks read /proc directly, so they need no extra dependency.
"""

import os
import resource
import secrets
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from ilr import sandbox
from ilr.sandbox import (
    ALLOW_ENV_VAR,
    CodeExecutionDisabledError,
    ExecutionResult,
    SandboxLimits,
    code_execution_allowed,
    extract_python_code,
    run_tests,
    run_tests_batch,
)
from ilr.testing import ProcessInfo, descendants_of, list_processes


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")

FAST = SandboxLimits(timeout_s=10.0)


@pytest.fixture(autouse=True)
def _allow_execution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ALLOW_ENV_VAR, "1")


def _isolation_of_a_run() -> str:
    return run_tests("pass", ["assert True"], limits=FAST).isolation


def _contains_hostile_code(isolation: str) -> bool:
    # Only root without a uid drop lacks containment (documented); every other mode must contain everything.
    return os.geteuid() != 0 or isolation.endswith("+uid")


def _processes() -> dict[int, ProcessInfo]:
    """Every process on the machine, zombies included: an unreaped child is still one left behind."""
    return list_processes(zombies=True)


def _all_descendants(table: dict[int, ProcessInfo] | None = None) -> set[int]:
    return descendants_of(os.getpid(), _processes() if table is None else table)


# Children this test process had before the current test (e.g. the reward pool's forkserver and workers, started by
# other test files): they are not the sandbox's to clean up.
_preexisting: set[int] = set()


@pytest.fixture(autouse=True)
def _record_preexisting_children() -> None:
    _preexisting.clear()
    _preexisting.update(_all_descendants())


def _descendants(table: dict[int, ProcessInfo] | None = None) -> set[int]:
    """Descendants of this test process started during the current test."""
    return _all_descendants(table) - _preexisting


class _Watcher:
    """Polls the process table in a thread while a sandbox runs."""

    def __init__(self, marker: str | None = None) -> None:
        self.marker = marker
        self.peak_descendants = 0
        self.marker_seen = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            table = _processes()
            self.peak_descendants = max(self.peak_descendants, len(_descendants(table)))
            if self.marker and any(self.marker in process.command for process in table.values()):
                self.marker_seen = True
            time.sleep(0.02)

    def __enter__(self) -> "_Watcher":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --- scoring ---------------------------------------------------------------------------------------------------------


def test_correct_code_passes():
    result = run_tests("def add(a, b):\n    return a + b\n", ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"])
    assert (result.status, result.passed, result.total, result.fraction) == ("ok", 2, 2, 1.0)
    assert result.duration_s > 0


def test_partially_correct_code_gets_the_fraction():
    program = "def square(x):\n    return x * x if x < 3 else x + x\n"
    tests = ["assert square(1) == 1", "assert square(2) == 4", "assert square(4) == 16"]
    result = run_tests(program, tests)
    assert (result.status, result.passed, result.total) == ("ok", 2, 3)
    assert result.fraction == pytest.approx(2 / 3)
    assert "<test 2>" in result.stderr and "AssertionError" in result.stderr


def test_wrong_code_fails():
    result = run_tests("def add(a, b):\n    return a - b\n", ["assert add(1, 2) == 3", "assert add(2, 2) == 4"])
    assert (result.status, result.passed, result.fraction) == ("ok", 0, 0.0)


def test_syntax_error_scores_zero():
    result = run_tests("def add(a, b)\n    return a + b\n", ["assert add(1, 2) == 3"])
    assert (result.status, result.passed, result.fraction) == ("error", 0, 0.0)
    assert "SyntaxError" in result.stderr


def test_setup_runs_before_the_solution_and_tests_share_its_namespace():
    setup = "import math\nCONSTANT = 41"
    program = "def f():\n    return CONSTANT + 1\n"
    result = run_tests(program, ["assert f() == 42", "assert math.sqrt(4) == 2", "assert f() == 0"], setup=setup)
    assert (result.status, result.passed) == ("ok", 2)


def test_stdout_is_returned():
    result = run_tests("print('hello from the sandbox')", ["assert True"])
    assert result.stdout == "hello from the sandbox\n"


def test_empty_tests_are_rejected():
    with pytest.raises(ValueError, match="empty"):
        run_tests("x = 1", [])
    with pytest.raises(ValueError, match="empty"):
        run_tests_batch([("x = 1", ["assert x"], ""), ("x = 1", [], "")])
    with pytest.raises(TypeError):
        run_tests("x = 1", "assert x == 1")  # a string is not a list of tests


def test_fraction():
    assert ExecutionResult(3, 4, "ok", "", "", 0.1).fraction == 0.75
    assert ExecutionResult(0, 0, "error", "", "", 0.1).fraction == 0.0


def test_limits_are_validated():
    with pytest.raises(ValueError, match="timeout_s"):
        SandboxLimits(timeout_s=0)
    with pytest.raises(ValueError, match="max_processes"):
        SandboxLimits(max_processes=-1)


# --- opt-in -----------------------------------------------------------------------------------------------------------


def test_execution_is_refused_unless_enabled(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(ALLOW_ENV_VAR, raising=False)
    assert not code_execution_allowed()
    assert not code_execution_allowed(False)
    for allow in (None, False):
        with pytest.raises(CodeExecutionDisabledError) as excinfo:
            run_tests("x = 1", ["assert x == 1"], allow=allow)
        message = str(excinfo.value)
        assert "untrusted" in message and ALLOW_ENV_VAR in message and "allow_code_execution" in message
    with pytest.raises(CodeExecutionDisabledError):
        run_tests_batch([("x = 1", ["assert x == 1"], "")])

    assert run_tests("x = 1", ["assert x == 1"], allow=True).passed == 1
    monkeypatch.setenv(ALLOW_ENV_VAR, "0")
    assert not code_execution_allowed()
    monkeypatch.setenv(ALLOW_ENV_VAR, "1")
    assert code_execution_allowed(False)
    assert run_tests("x = 1", ["assert x == 1"]).passed == 1


# --- containment -----------------------------------------------------------------------------------------------------


def test_infinite_loop_times_out_and_leaves_no_process(isolation: str):
    start = time.monotonic()
    with _Watcher() as watcher:
        result = run_tests(
            "def f():\n    while True:\n        pass\n", ["assert True", "f()"], limits=SandboxLimits(1.0)
        )
    elapsed = time.monotonic() - start
    assert result.status == "timeout"
    assert result.passed == 1  # the test reported before the timeout still counts
    assert 1.0 <= elapsed < 4.0
    assert watcher.peak_descendants >= 2  # the launcher and the sandbox were seen running
    assert _descendants() == set()


def test_cpu_time_limit_kills():
    result = run_tests("while True:\n    pass\n", ["assert True"], limits=SandboxLimits(timeout_s=20.0, cpu_time_s=1))
    assert result.status == "killed"
    assert result.passed == 0
    assert result.duration_s < 10.0


def test_background_and_double_forked_processes_are_killed(isolation: str):
    # A unique `sleep` argument; `secrets`, not `random`, which conftest seeds identically in every run.
    marker = f"{300 + secrets.randbelow(600)}.{secrets.randbelow(10**6):06d}"
    program = f"""
import os, subprocess, time
pid = os.fork()
if pid == 0:
    os.setsid()  # leaves the process group
    if os.fork() == 0:
        os.execv("/bin/sleep", ["sleep", "{marker}"])  # reparented once its parent exits
    os._exit(0)
os.waitpid(pid, 0)
subprocess.Popen(["sleep", "{marker}1"], start_new_session=True)
time.sleep(1.0)
"""
    with _Watcher(marker) as watcher:
        result = run_tests(program, ["assert True"], limits=FAST)
    assert (result.status, result.passed) == ("ok", 1), result.stderr
    assert watcher.marker_seen, "the background processes never started, so the test proves nothing"
    assert not any(marker in process.command for process in _processes().values())
    assert _descendants() == set()


def test_fork_bomb_is_contained():
    isolation = _isolation_of_a_run()
    if not _contains_hostile_code(isolation):
        pytest.skip(f"{isolation!r} as root cannot contain a fork bomb; not running one")
    program = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    limits = SandboxLimits(timeout_s=2.0, max_processes=16)
    with _Watcher() as watcher:
        result = run_tests(program, ["assert True"], limits=limits)
    assert result.status == "timeout" and result.passed == 0
    # The bomb did fork, and never past the limit (plus the launcher outside the sandbox).
    assert 8 <= watcher.peak_descendants <= limits.max_processes + 1
    assert _descendants() == set()
    assert os.fork  # the machine can still fork: the test itself goes on


def test_memory_hog_is_contained():
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result = run_tests("def hog():\n    return bytearray(4 * 1024**3)\n", ["assert len(hog()) > 0"], limits=FAST)
    assert (result.status, result.passed) == ("ok", 0)
    assert "MemoryError" in result.stderr
    result = run_tests("blob = bytearray(4 * 1024**3)", ["assert True"], limits=FAST)
    assert (result.status, result.passed) == ("error", 0)
    assert "MemoryError" in result.stderr
    # No child ever got near the 4 GiB (ru_maxrss is in KiB; it is the largest child of the whole run so far, which
    # may be an earlier test's subprocess of a few hundred MiB).
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < max(before, 2 * 1024**2)


def test_huge_output_is_capped():
    limits = SandboxLimits(max_output_bytes=4096)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = run_tests("import sys\nsys.stdout.write('x' * 100_000_000)\n", ["assert True"], limits=limits)
    assert (result.status, result.passed) == ("ok", 1)
    assert result.stdout.startswith("x" * 4096)
    assert len(result.stdout) <= 4096 + len(sandbox._TRUNCATION_NOTE)
    assert "truncated" in result.stdout
    # The 100 MB went through the pipe without ever being held in this process (ru_maxrss is in KiB).
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 50 * 1024


def test_files_outside_the_workdir_are_not_written(tmp_path: Path):
    isolation = _isolation_of_a_run()
    if not _contains_hostile_code(isolation):
        pytest.skip(f"{isolation!r} as root cannot protect files")
    name = f"ilr-sandbox-escape-{uuid.uuid4().hex}"
    targets = {
        "tmp": tmp_path / "nested" / name,  # a directory the test owns under /tmp
        "home": Path.home() / name,
        "repo": Path(__file__).parent / name,
    }
    program = "import os\n" + "".join(
        f"""
try:
    os.makedirs(os.path.dirname({str(path)!r}), exist_ok=True)
    with open({str(path)!r}, "w") as f:
        f.write("escaped")
    print("{key} WROTE")
except OSError as exc:
    print("{key} BLOCKED", exc.errno)
"""
        for key, path in targets.items()
    )
    try:
        result = run_tests(program, ["assert True"], limits=FAST)
        assert result.status == "ok", result.stderr
        for key, path in targets.items():
            assert not path.exists(), f"the sandbox wrote {path}"
            assert f"{key} " in result.stdout  # the attempt was made
        # Home and repository are refused outright; /tmp in namespace mode is a private tmpfs, so the write
        # "succeeds" there and vanishes with the sandbox.
        assert "home BLOCKED" in result.stdout and "repo BLOCKED" in result.stdout
        if isolation.startswith("namespace"):
            assert "tmp WROTE" in result.stdout
    finally:
        for path in targets.values():
            path.unlink(missing_ok=True)


def test_workdir_is_fresh_and_removed():
    program = "import os\nwith open('scratch.txt', 'w') as f:\n    f.write('data')\nprint(os.getcwd())\n"
    test = "import os\nassert os.listdir('.') == ['scratch.txt']"
    first = run_tests(program, [test], limits=FAST)
    second = run_tests(program, [test], limits=FAST)
    assert (first.passed, second.passed) == (1, 1), first.stderr
    workdirs = [first.stdout.strip(), second.stdout.strip()]
    assert workdirs[0] != workdirs[1]
    for workdir in workdirs:
        assert os.path.basename(workdir).startswith("ilr-sandbox-")
        assert not os.path.exists(workdir)


def test_parent_environment_secrets_are_hidden(monkeypatch: pytest.MonkeyPatch, isolation: str):
    secret = f"hf_fake_{uuid.uuid4().hex}"
    monkeypatch.setenv("HF_TOKEN", secret)
    program = f"""
import os
print(sorted(os.environ))
for pid in ({os.getpid()}, os.getppid()):
    try:
        with open(f"/proc/{{pid}}/environ", "rb") as f:
            print("ENVIRON READ", f.read())
    except OSError as exc:
        print("ENVIRON BLOCKED", type(exc).__name__)
"""
    result = run_tests(program, ["assert True"], limits=FAST)
    assert result.status == "ok", result.stderr
    assert "'PATH'" in result.stdout and "HF_TOKEN" not in result.stdout
    assert secret not in result.stdout and secret not in result.stderr
    # /proc/<pid>/environ shows the environment a process started with, not `monkeypatch.setenv`'s, so it is the
    # failed read below that proves the containment. Root without a uid drop can read it (documented).
    if _contains_hostile_code(result.isolation):
        assert "ENVIRON READ" not in result.stdout and result.stdout.count("ENVIRON BLOCKED") == 2


def test_network_is_blocked(isolation: str):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        program = f"""
import socket
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=2).close()
    print("NET CONNECTED")
except OSError as exc:
    print("NET BLOCKED", type(exc).__name__)
"""
        result = run_tests(program, ["assert True"], limits=FAST)
        listener.settimeout(0.3)
        with pytest.raises(TimeoutError):
            listener.accept()
    assert result.status == "ok", result.stderr
    assert "NET BLOCKED" in result.stdout and "NET CONNECTED" not in result.stdout
    # Unix socket pairs (asyncio, multiprocessing) keep working.
    result = run_tests("import socket\na, b = socket.socketpair()\na.send(b'x')\n", ["assert b.recv(1) == b'x'"])
    assert result.passed == 1, result.stderr


def test_exiting_early_cannot_fake_a_pass():
    result = run_tests("import os\nos._exit(0)\n", ["assert True"])
    assert (result.status, result.passed) == ("exited", 0)
    result = run_tests("import sys\nsys.exit(0)\n", ["assert True"])
    assert (result.status, result.passed) == ("error", 0)
    result = run_tests("x = 1", ["assert x == 1", "import os; os._exit(0)", "assert x == 1"])
    assert (result.status, result.passed) == ("exited", 1)


def test_fake_pass_markers_are_ignored():
    program = """
import os, sys
print("PASS\\n0 pass\\ndone\\nALL TESTS PASSED")
sys.stderr.write("0 pass\\n")
for fd in range(3, 1024):  # every fd the harness might report on, with lookalike and non-ASCII lines
    try:
        os.write(fd, b"0 pass\\n1 pass\\ndone\\n" + b"0" * 32 + b" 0 pass\\n\\xff\\xfe 1 pass\\n\\xc3\\xa9 done\\n")
    except OSError:
        pass
"""
    result = run_tests(program, ["assert False", "assert 1 == 2"])
    assert (result.status, result.passed, result.fraction) == ("ok", 0, 0.0)


def test_code_runs_unprivileged_in_its_own_pid_namespace():
    isolation = _isolation_of_a_run()
    if not isolation.startswith("namespace"):
        pytest.skip(f"no namespaces here ({isolation!r})")
    program = "import os\nprint(os.getuid(), os.getpid(), sorted(p for p in os.listdir('/proc') if p.isdigit()))\n"
    result = run_tests(program, ["assert True"], limits=FAST)
    uid, pid, pids = result.stdout.split(" ", 2)
    assert int(uid) != 0
    assert int(pid) == 1 and pids.strip() == "['1']"  # the harness is the namespace's init and alone in it


def test_a_broken_sandbox_is_reported_as_such(monkeypatch: pytest.MonkeyPatch):
    if not _isolation_of_a_run().startswith("namespace"):
        pytest.skip("needs namespace isolation")
    # Without the interpreter's directories in the sandbox's root, the harness cannot start: that must be reported
    # as an infrastructure failure, not scored as the model's.
    monkeypatch.setattr(sandbox, "_interpreter_paths", lambda: [])
    result = run_tests("x = 1", ["assert x == 1"], limits=FAST)
    assert (result.status, result.passed) == ("sandbox_error", 0)
    assert "[sandbox error]" in result.stderr and "No such file" in result.stderr


def test_isolation_can_be_forced(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(sandbox.ISOLATION_ENV_VAR, "process")
    assert sandbox.sandbox_isolation() == "process"
    assert run_tests("x = 1", ["assert x == 1"]).isolation.startswith("process")
    monkeypatch.setenv(sandbox.ISOLATION_ENV_VAR, "chroot")
    with pytest.raises(ValueError, match="ILR_SANDBOX_ISOLATION"):
        sandbox.sandbox_isolation()


# --- batch ------------------------------------------------------------------------------------------------------------


def test_batch_runs_concurrently_and_preserves_order():
    program = "import time\nstart = time.time()\ntime.sleep(0.4)\nprint({i}, start, time.time())\n"
    jobs = [(program.format(i=i), [f"assert {i % 3} != 0"], "") for i in range(16)]
    results = run_tests_batch(jobs, limits=FAST, max_workers=4)
    assert len(results) == 16
    intervals = []
    for i, result in enumerate(results):
        index, start, end = result.stdout.split()
        assert int(index) == i
        assert result.passed == (1 if i % 3 else 0)
        intervals.append((float(start), float(end)))
    most_at_once = max(sum(1 for s, e in intervals if s <= t < e) for t, _ in intervals)
    assert most_at_once > 1
    assert _descendants() == set()


# --- extract_python_code ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("text\n```python\ndef f():\n    return 1\n```\nmore", "def f():\n    return 1"),
        ("```python\nfirst = 1\n```\nthen\n```py\nsecond = 2\n```", "second = 2"),
        ("```\nbare = 1\n```", "bare = 1"),
        ("```Python3\nx = 3\n```", "x = 3"),
        ("```python\nok = 1\n```\n```bash\nls -la\n```", "ok = 1"),
        ("```python\nkeep = 1\n```\n```python\n\n```", "keep = 1"),
        ("no code here", None),
        ("```bash\nls\n```", None),
        ("```python\ntruncated = (", None),
    ],
)
def test_extract_python_code(completion: str, expected: str | None):
    assert extract_python_code(completion) == expected

"""Processes the project starts end with the process that started them, however it dies (SIGKILL included).

Each test kills a real owner process and looks for what it left, by session or ancestry (never by name): the reward
pool (workers, fork server, resource tracker), a sandbox whose code started processes of its own, `exit_with` on its
own, and the suite's own end-of-run check (`conftest.py`).
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ilr import sandbox
from ilr.lifetime import process_start_time
from ilr.testing import (
    assert_session_ends,
    descendants_of,
    describe_processes,
    list_processes,
    processes_of_session,
    wait_until_gone,
)


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the target is Linux")

# What the project promises: "within a few seconds". The measured time is far lower (see the README).
EXIT_S = 5.0


def _start(tmp_path: Path, source: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    """Run a Python script in a session of its own (its pid is the session id); it prints READY when set up."""
    script = tmp_path / f"owner_{time.monotonic_ns()}.py"
    script.write_text(textwrap.dedent(source))
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_ready(process: subprocess.Popen) -> None:
    line = process.stdout.readline()
    assert line.strip() == "READY", f"the owner process did not start (exit code {process.wait()})"


def _kill(process: subprocess.Popen) -> None:
    process.kill()
    process.wait()
    process.stdout.close()


def _wait_for(condition, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------------------------------
# The reward pool
# ---------------------------------------------------------------------------------------------------------------------
POOL_OWNER = """
    import time
    from ilr.rewards import score_math

    if __name__ == "__main__":
        assert score_math(["\\\\boxed{2}", "\\\\boxed{3}"], ["2", "2"], max_workers=2) == [1.0, 0.0]
        print("READY", flush=True)
        time.sleep(300)
"""


def test_reward_workers_fork_server_and_tracker_exit_when_the_owner_is_killed(tmp_path):
    owner = _start(tmp_path, POOL_OWNER)
    _wait_ready(owner)
    helpers = processes_of_session(owner.pid)
    del helpers[owner.pid]
    # Two workers, their fork server and the resource tracker: otherwise this test would prove nothing.
    assert len(helpers) >= 4, describe_processes(helpers)
    _kill(owner)
    assert_session_ends(owner.pid, EXIT_S)


# ---------------------------------------------------------------------------------------------------------------------
# `exit_with`: a helper whose owner is not its parent
# ---------------------------------------------------------------------------------------------------------------------
HELPER = """
    import os, sys, time
    from ilr.lifetime import exit_with

    owner, start_time, watch = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    if watch == "polling":
        del os.pidfd_open  # as on systems without pidfds (macOS, Linux before 5.3)
    exit_with(owner, start_time)
    print("READY", flush=True)
    time.sleep(300)
"""


@pytest.mark.parametrize("watch", ["pidfd", "polling"])
def test_exit_with_follows_an_owner_that_is_not_the_parent(tmp_path, watch):
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        helper = _start(tmp_path, HELPER, str(owner.pid), str(process_start_time(owner.pid)), watch)
        _wait_ready(helper)
        assert helper.poll() is None
        owner.kill()
        owner.wait()
        start = time.monotonic()
        assert helper.wait(timeout=EXIT_S) == 0
        assert time.monotonic() - start < EXIT_S
        helper.stdout.close()
    finally:
        owner.kill()
        owner.wait()


def test_exit_with_an_owner_already_gone_or_replaced_exits_at_once(tmp_path):
    wrong_start_time = process_start_time(os.getpid()) - 1  # this pid, but not this process: a reused pid
    helper = _start(tmp_path, HELPER, str(os.getpid()), str(wrong_start_time), "pidfd")
    assert helper.wait(timeout=30) == 0
    assert helper.stdout.read() == ""  # never got as far as READY
    helper.stdout.close()


# ---------------------------------------------------------------------------------------------------------------------
# The sandbox: its launcher kills everything the code started, even processes that left its group
# ---------------------------------------------------------------------------------------------------------------------
SANDBOX_OWNER = """
    from ilr.sandbox import SandboxLimits, run_tests_batch

    ESCAPE = '''
    import os, sys, time
    pid = os.fork()
    if pid == 0:
        os.setsid()  # leaves the sandbox's process group
        if os.fork() == 0:
            time.sleep(300)
        os._exit(0)
    os.waitpid(pid, 0)
    time.sleep(300)
    '''
    if __name__ == "__main__":
        print("READY", flush=True)
        run_tests_batch([(ESCAPE, ["assert True"], "")] * 2, limits=SandboxLimits(timeout_s=300), max_workers=2, allow=True)
"""


@pytest.mark.parametrize("isolation", ["auto", "process"])
def test_sandboxes_and_what_their_code_started_end_when_the_caller_is_killed(tmp_path, isolation):
    env = {} if isolation == "auto" else {sandbox.ISOLATION_ENV_VAR: "process"}
    before = descendants_of(os.getpid(), list_processes())
    owner = _start(tmp_path, SANDBOX_OWNER, env=env)
    _wait_ready(owner)

    def started() -> dict:
        table = list_processes()
        return {pid: table[pid] for pid in descendants_of(os.getpid(), table) - before - {owner.pid}}

    # Per program: its launcher, the sandbox and the escaped sleeper (the forked intermediate exits at once).
    _wait_for(lambda: len(started()) >= 6)
    _kill(owner)
    # The launchers are in sessions of their own; once orphaned they and their trees are reparented to pytest (a child
    # subreaper, see conftest.py), so "descendants of pytest started here" finds them all.
    left, seconds = wait_until_gone(started, EXIT_S)
    assert not left, f"still alive {seconds:.1f} s after the caller was killed:\n{describe_processes(left)}"
    for pid, info in list_processes(zombies=True).items():
        if info.ppid == os.getpid() and info.state == "Z" and pid not in before:
            os.waitpid(pid, os.WNOHANG)


# ---------------------------------------------------------------------------------------------------------------------
# The suite's own check: a test run that leaves a process behind fails
# ---------------------------------------------------------------------------------------------------------------------
def _run_pytest(tmp_path: Path, test_source: str) -> tuple[subprocess.CompletedProcess, int]:
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(test_source))
    tests_dir = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tests_dir), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q", "test_inner.py"]
    with subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    ) as process:  # fmt: skip
        output, _ = process.communicate(timeout=240)
    return subprocess.CompletedProcess(command, process.returncode, output), process.pid


def test_a_test_run_that_leaves_a_process_behind_fails(tmp_path):
    result, session = _run_pytest(
        tmp_path,
        """
        import subprocess, sys

        def test_leaks():
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        """,
    )
    try:
        assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout
        assert "1 passed" in result.stdout and "processes left behind" in result.stdout
        assert "import time; time.sleep(300)" in result.stdout  # the report names the process
    finally:
        for pid in processes_of_session(session):
            os.kill(pid, signal.SIGKILL)
        assert_session_ends(session, EXIT_S)


def test_a_test_run_that_cleans_up_passes(tmp_path):
    result, session = _run_pytest(
        tmp_path,
        """
        import subprocess, sys

        def test_waits_for_its_process():
            assert subprocess.run([sys.executable, "-c", "pass"]).returncode == 0
        """,
    )
    assert result.returncode == pytest.ExitCode.OK, result.stdout
    assert "processes left behind" not in result.stdout
    assert_session_ends(session, EXIT_S)

"""Shared test set-up: offline Hub, no network, seeded RNGs, the tiny fixture models, and a check that the run leaves
no process behind.

Kept lean on purpose: it runs for every test file, so it imports nothing heavy. torch and transformers are loaded
only when a fixture needs them.
"""

import contextlib
import ctypes
import logging
import os
import random
import secrets
import sys

import pytest

from ilr.testing import (
    TINY_MODEL_A,
    TINY_MODEL_B,
    TINY_VLLM_MODEL_A,
    TINY_VLLM_MODEL_B,
    ProcessInfo,
    TinyModel,
    block_network,
    build_tiny_model,
    descendants_of,
    describe_processes,
    environment_of,
    list_processes,
    wait_until_gone,
)


# Set before any test module imports huggingface_hub/transformers/datasets, which read them at import time. Without
# them an accidental Hub call stalls for tens of seconds before failing; with them it fails at once.
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ[_name] = "1"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # keeps failure output readable
# The tiny tokenizers train with Rust threads; without this, tests that fork later (process pools) warn and may hang.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# vLLM's CPU engines size their KV cache from this (GiB); unset, each claims most of the machine's memory.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

SEED = 42

_network_guard = contextlib.ExitStack()


# Every process this run starts inherits this marker, unless it is given an environment of its own (the sandbox).
TEST_RUN_ENV_VAR = "ILR_TEST_RUN"
_TEST_RUN_ID = f"{os.getpid()}-{secrets.token_hex(8)}"
# How long processes may take to exit at the end of the run before they count as left behind.
_LEAK_GRACE_S = 5.0
_PR_SET_CHILD_SUBREAPER = 36
_processes_before: set[tuple[int, int]] = set()  # (pid, start time): a reused pid is a new process


def pytest_configure(config: pytest.Config) -> None:
    # A hook rather than a fixture, so that collection (module imports) and session fixtures are covered too.
    _network_guard.enter_context(block_network())
    os.environ[TEST_RUN_ENV_VAR] = _TEST_RUN_ID
    _processes_before.update((p.pid, p.start_time) for p in list_processes(zombies=True).values())
    if sys.platform.startswith("linux"):
        # Orphans of processes the tests start (e.g. the helpers of a run a test kills) are reparented to this process
        # instead of init, so they stay findable as its descendants even without the marker.
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def pytest_unconfigure(config: pytest.Config) -> None:
    _network_guard.close()


def _own_multiprocessing_helpers() -> set[int]:
    """This process's fork server and resource tracker: they exit with it (their pipes close), not before."""
    forkserver = getattr(sys.modules.get("multiprocessing.forkserver"), "_forkserver", None)
    tracker = getattr(sys.modules.get("multiprocessing.resource_tracker"), "_resource_tracker", None)
    return {pid for pid in (getattr(forkserver, "_forkserver_pid", None), getattr(tracker, "_pid", None)) if pid}


def _started_by_this_run() -> dict[int, ProcessInfo]:
    """Live processes this test run started, found by ancestry or by the marker, never by name."""
    table = list_processes()
    ours = descendants_of(os.getpid(), table)
    ours |= {pid for pid in table if environment_of(pid).get(TEST_RUN_ENV_VAR) == _TEST_RUN_ID}
    ours -= _own_multiprocessing_helpers() | {os.getpid()}
    return {pid: table[pid] for pid in ours if (pid, table[pid].start_time) not in _processes_before}


@pytest.hookimpl(trylast=True)  # after session fixtures are torn down
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if a process it started is still alive: workers, sandboxes or servers must end with their parent."""
    if "ilr.rewards" in sys.modules:
        sys.modules["ilr.rewards"].shutdown_reward_pool()  # as at interpreter exit, but now, to check the rest
    left, _ = wait_until_gone(_started_by_this_run, _LEAK_GRACE_S)
    if not left:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = (
        f"{len(left)} process(es) started by this test run were still alive {_LEAK_GRACE_S:.0f} s after it ended "
        f"(marker {TEST_RUN_ENV_VAR}={_TEST_RUN_ID}, or descendants of pytest):\n{describe_processes(left)}"
    )
    if reporter is not None:
        reporter.write_sep("=", "processes left behind", red=True)
        reporter.write_line(message)
    else:
        print(message, file=sys.stderr)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True)
def _restore_ilr_loggers():
    """`ilr.train.main` sets the `ilr` loggers' level from the recipe's `log_level`, as a script should, and libraries may
    reconfigure logging; undo it after each test, or a later test's `caplog` misses warnings."""
    manager = logging.root.manager
    names = ["ilr", *(name for name in manager.loggerDict if name.startswith("ilr."))]
    saved = {name: (logging.getLogger(name).level, logging.getLogger(name).disabled) for name in names}
    yield
    for name in manager.loggerDict:
        if name == "ilr" or name.startswith("ilr."):
            logger = logging.getLogger(name)
            logger.setLevel(saved.get(name, (logging.NOTSET, False))[0])
            logger.disabled = saved.get(name, (logging.NOTSET, False))[1]


@pytest.fixture(autouse=True)
def _seed_rngs() -> None:
    """Seed Python's RNG and, if already imported, numpy's and torch's before every test."""
    random.seed(SEED)
    # A library not imported yet is seeded below on a later test; importing torch just for this would slow down the
    # pure-Python tests (and torch starts from a fixed default seed anyway).
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(SEED)
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(SEED)


@pytest.fixture
def one_thread():
    """One torch thread for the test: on 2 shared cores, torch's default intra-op threads fight with every other
    process, and one thread is much faster."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


_isolation_of_mode: dict[str, str] = {}


@pytest.fixture(params=["auto", "process"])
def isolation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a sandbox test with the machine's best isolation, then again with the forced `process` fallback; the value
    is the isolation a run gets there (e.g. `"namespace+uid"`). The test module must allow execution."""
    from ilr import sandbox

    if request.param == "process":
        monkeypatch.setenv(sandbox.ISOLATION_ENV_VAR, "process")
    else:
        monkeypatch.delenv(sandbox.ISOLATION_ENV_VAR, raising=False)
    if request.param not in _isolation_of_mode:
        limits = sandbox.SandboxLimits(timeout_s=10.0)
        _isolation_of_mode[request.param] = sandbox.run_tests("pass", ["assert True"], limits=limits).isolation
    return _isolation_of_mode[request.param]


@pytest.fixture(scope="session")
def tiny_model_a_info(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """Tiny Llama (hidden 64, tied embeddings) with a ChatML tokenizer of 512 ids; built once per run."""
    return build_tiny_model(TINY_MODEL_A, tmp_path_factory.mktemp("tiny_model_a"))


@pytest.fixture(scope="session")
def tiny_model_b_info(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """Tiny Llama (hidden 48, untied) with a Llama-3-style tokenizer of 384 ids; built once per run."""
    return build_tiny_model(TINY_MODEL_B, tmp_path_factory.mktemp("tiny_model_b"))


@pytest.fixture(scope="session")
def tiny_model_a(tiny_model_a_info: TinyModel) -> str:
    """Path of tiny model A, for `from_pretrained`."""
    return tiny_model_a_info.path


@pytest.fixture(scope="session")
def tiny_model_b(tiny_model_b_info: TinyModel) -> str:
    """Path of tiny model B, for `from_pretrained`."""
    return tiny_model_b_info.path


# ---------------------------------------------------------------------------------------------------------------------
# The Hub test server (tests/hub_server.py): one per run, emptied before each test that uses it
# ---------------------------------------------------------------------------------------------------------------------
HUB_TOKEN = "hf_TESTwriteTOKEN0123456789abcdef"


@pytest.fixture(scope="session")
def _hub_server(tmp_path_factory: pytest.TempPathFactory):
    from hub_server import USER, HubServer

    server = HubServer(tmp_path_factory.mktemp("hub"), tokens={HUB_TOKEN: USER}).start()
    yield server
    server.stop()


@pytest.fixture
def hub(_hub_server):
    """
    The Hub test server, empty: no repository, fault or recorded request. `hub.url` is its endpoint. A test fails if a
    client called an endpoint the server does not implement (a library upgrade that changed what it calls).
    """
    _hub_server.reset()
    yield _hub_server
    unserved = _hub_server.unserved()
    _hub_server.reset()
    assert not unserved, f"the clients called endpoints the Hub test server does not serve: {unserved}"


@pytest.fixture
def hub_online(hub, monkeypatch):
    """
    Point `huggingface_hub` in this process at the test server and lift offline mode for one test, through the
    library's own settings (`constants.ENDPOINT`, `constants.HF_HUB_OFFLINE`, read at each call) and the variables
    `ilr.hub` checks. Code that must see `HF_ENDPOINT` at import time (`datasets`, the CLI) runs in a subprocess
    instead (`hub_server.run_client`).
    """
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "0")
    return hub


@pytest.fixture(scope="session")
def tiny_vllm_model_a(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """Tiny model A's tokenizer and tied embeddings with two 32-wide heads, which vLLM's CPU engine accepts."""
    return build_tiny_model(TINY_VLLM_MODEL_A, tmp_path_factory.mktemp("tiny_vllm_model_a"))


@pytest.fixture(scope="session")
def tiny_vllm_model_b(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """Tiny model B's tokenizer and untied head with two 32-wide heads, which vLLM's CPU engine accepts."""
    return build_tiny_model(TINY_VLLM_MODEL_B, tmp_path_factory.mktemp("tiny_vllm_model_b"))

"""Shared test set-up: offline Hub, no network, seeded RNGs and the tiny fixture models.

Kept lean on purpose: it runs for every test file, so it imports nothing heavy. torch and transformers are loaded
only when a fixture needs them.
"""

import contextlib
import logging
import os
import random
import sys

import pytest

from ilr.testing import TINY_MODEL_A, TINY_MODEL_B, TinyModel, block_network, build_tiny_model


# Set before any test module imports huggingface_hub/transformers/datasets, which read them at import time. Without
# them an accidental Hub call stalls for tens of seconds before failing; with them it fails at once.
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ[_name] = "1"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # keeps failure output readable
# The tiny tokenizers train with Rust threads; without this, tests that fork later (process pools) warn and may hang.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SEED = 42

_network_guard = contextlib.ExitStack()


def pytest_configure(config: pytest.Config) -> None:
    # A hook rather than a fixture, so that collection (module imports) and session fixtures are covered too.
    _network_guard.enter_context(block_network())


def pytest_unconfigure(config: pytest.Config) -> None:
    _network_guard.close()


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

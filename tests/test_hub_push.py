"""Background Hub pushes of trained agents (`ilr.hub.HubPusher`) and their model cards (`build_training_card`).

The pushes go through the real `huggingface_hub.HfApi` over HTTP to the Hub test server (`tests/hub_server.py`),
which stores what it is sent and injects the faults (5xx, 429 with `Retry-After`, dropped connections, 401/403/404);
files, threads and retries are real. The only stand-in is the pusher's `sleep`, so that its backoff is recorded rather
than waited (the client's own retries inside `huggingface_hub` do wait, a second each).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.utils import filter_repo_objects

from conftest import HUB_TOKEN
from hub_server import Fault
from ilr.cards import build_training_card, redact_recipe
from ilr.hub import (
    DEFAULT_PUSH_IGNORE_PATTERNS,
    HubPusher,
    HubUnavailableError,
    _is_transient,
    push_files,
    step_revision,
)


REPO_ID = "org/llama-8b-ilr"
TOKEN = HUB_TOKEN


class RecordingSleep:
    def __init__(self):
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def api(hub_online) -> HfApi:
    """The real Hub client, talking to the test server with a token that may write to `org/`."""
    return HfApi(endpoint=hub_online.url, token=TOKEN)


def write_checkpoint(root: Path, step: int, agent: str = "llama-8b") -> Path:
    """A checkpoint laid out as `ILRTrainer.save_checkpoint` writes it; returns the agent's folder."""
    folder = root / f"checkpoint-{step}" / agent
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(hashlib.sha256(f"weights {step}".encode()).digest() * 64)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    (folder / "optimizer.pt").write_bytes(b"optimizer state" * 100)
    (folder / "scheduler.pt").write_bytes(b"scheduler state")
    (folder.parent / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    (folder.parent / "rng_state.pth").write_bytes(b"rng")
    return folder


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return tmp_path / "outputs" / "ilr-group1"


# ---------------------------------------------------------------------------------------------------------------------
# Pushes
# ---------------------------------------------------------------------------------------------------------------------
def test_checkpoints_go_to_step_branches_in_order_and_the_final_model_to_main(hub_online, api, run_dir, tmp_path):
    hub = hub_online
    gate = threading.Event()
    hub.inject(Fault("POST", r"^/api/repos/create$", status=0, gate=gate))  # holds the first request
    staging = tmp_path / "staging"
    pusher = HubPusher(REPO_ID, token=TOKEN, private=True, api=api, staging_dir=staging)
    futures = []
    for step in (10, 20, 30):
        folder = write_checkpoint(run_dir, step)
        state = folder.parent / "trainer_state.json"
        futures.append(
            pusher.push_folder(
                folder,
                revision=step_revision(step),
                commit_message=f"Checkpoint step {step}",
                extra_files={"trainer_state.json": state},
            )
        )
    final = run_dir / "llama-8b"
    final.mkdir()
    (final / "model.safetensors").write_bytes(b"final weights")
    (final / "README.md").write_text("the card save_pretrained writes")
    card = tmp_path / "card.md"
    card.write_text("---\ntags: [ilr]\n---\n# ILR card\n")
    futures.append(pusher.push_folder(final, commit_message="Final model", extra_files={"README.md": card}))

    # Queued, not pushed: push_folder returned while the (held) upload runs in the background.
    assert pusher.pending == 4 and not futures[0].done()
    before = tree_digest(run_dir)
    gate.set()
    results = pusher.wait()
    pusher.close()

    assert [r.ok for r in results] == [True] * 4
    assert [r.revision for r in results] == ["step-000010", "step-000020", "step-000030", "main"]
    assert [r.attempts for r in results] == [1] * 4
    assert [f.result() for f in futures] == results
    assert all(r.url.startswith(f"{hub.url}/{REPO_ID}/commit/") for r in results)
    # What the real client called: the repository once, then per push its branch (none for main), the upload modes
    # and the commit, in the order queued; the card's metadata is validated before the final commit.
    api_path = f"/api/models/{REPO_ID}"
    expected = ["POST /api/repos/create"]
    for revision in ("step-000010", "step-000020", "step-000030"):
        expected += [f"POST {api_path}/{kind}/{revision}" for kind in ("branch", "preupload", "commit")]
    expected += ["POST /api/validate-yaml", f"POST {api_path}/preupload/main", f"POST {api_path}/commit/main"]
    assert hub.endpoints() == [f"{endpoint} -> 200" for endpoint in expected]
    # One private repository, one branch per step (none for main), commits in the order queued.
    assert hub.repo("model", REPO_ID).meta["private"] is True
    assert len(hub.hits("POST", r"^/api/repos/create$")) == 1
    assert [r.path.rsplit("/", 1)[1] for r in hub.hits("POST", r"/branch/")] == [f"step-0000{s}0" for s in (1, 2, 3)]
    commits = [r.path.rsplit("/", 1)[1] for r in hub.hits("POST", r"/commit/")]
    assert commits == ["step-000010", "step-000020", "step-000030", "main"]
    assert set(hub.branches(REPO_ID)) == {"main", "step-000010", "step-000020", "step-000030"}
    # The Hub gets the model, tokenizer and trainer state, never the optimizer/scheduler state.
    step10 = hub.files_at(REPO_ID, "step-000010")
    assert set(step10) == {"model.safetensors", "config.json", "tokenizer.json", "trainer_state.json"}
    assert step10["model.safetensors"] == (run_dir / "checkpoint-10" / "llama-8b" / "model.safetensors").read_bytes()
    assert hub.files_at(REPO_ID, "step-000020")["trainer_state.json"] == b'{"global_step": 20}'
    assert hub.commit_messages(REPO_ID, "step-000010")[0] == "Checkpoint step 10"
    # Main holds only the final model, with the card in place of the folder's README.
    assert hub.files_at(REPO_ID, "main") == {"model.safetensors": b"final weights", "README.md": card.read_bytes()}
    assert hub.commit_messages(REPO_ID, "main")[0] == "Final model"
    # Nothing local changed, and the snapshots are gone.
    assert tree_digest(run_dir) == before
    assert (final / "README.md").read_text() == "the card save_pretrained writes"
    assert not any(staging.iterdir())


def test_transient_errors_are_retried_with_exponential_backoff(hub_online, api, run_dir):
    hub = hub_online
    # Repository creation is not retried by huggingface_hub: each of these reaches the pusher's own retry loop.
    create = r"^/api/repos/create$"
    hub.inject(Fault("POST", create, 503))
    hub.inject(Fault("POST", create, drop=True))
    hub.inject(Fault("POST", create, 429, headers={"Retry-After": "30"}))
    hub.inject(Fault("POST", create, 502))
    hub.inject(Fault("POST", create, 500))
    sleep = RecordingSleep()
    folder = write_checkpoint(run_dir, 10)
    with HubPusher(REPO_ID, api=api, sleep=sleep, max_retries=5, backoff=2.0) as pusher:
        pusher.push_folder(folder, revision=step_revision(10))
        (result,) = pusher.wait()
    assert result.ok and result.attempts == 6
    assert sleep.delays == [2.0, 4.0, 30.0, 16.0, 32.0]  # doubling; the 429's Retry-After when longer
    assert [r.status for r in hub.hits("POST", create)] == [503, -1, 429, 502, 500, 200]
    # The branch is created once, the commit made once, with every file whole.
    assert len(hub.hits("POST", r"/branch/")) == 1 and len(hub.hits("POST", r"/commit/")) == 1
    assert hub.files_at(REPO_ID, "step-000010")["model.safetensors"] == (folder / "model.safetensors").read_bytes()

    hub.reset()
    hub.inject(Fault("POST", create, 502, times=4))
    sleep = RecordingSleep()
    with HubPusher(REPO_ID, api=api, sleep=sleep, max_retries=4, backoff=2.0, max_backoff=5.0) as pusher:
        pusher.push_folder(write_checkpoint(run_dir, 20))
        assert pusher.wait()[0].ok
    assert sleep.delays == [2.0, 4.0, 5.0, 5.0]  # capped


def test_a_commit_interrupted_mid_upload_is_retried_by_the_client_and_lands_whole(hub_online, api, run_dir):
    """A connection dropped while the commit's body is being sent, then a 503: `huggingface_hub` retries the commit
    itself (a second each), so the pusher sees one attempt and the branch gets exactly one complete commit."""
    hub = hub_online
    hub.inject(Fault("POST", r"/commit/", drop=True))
    hub.inject(Fault("POST", r"/commit/", 503))
    folder = write_checkpoint(run_dir, 10)
    sleep = RecordingSleep()
    with HubPusher(REPO_ID, api=api, sleep=sleep) as pusher:
        pusher.push_folder(folder, revision=step_revision(10))
        (result,) = pusher.wait()
    assert result.ok and result.attempts == 1 and sleep.delays == []
    assert [r.status for r in hub.hits("POST", r"/commit/")] == [-1, 503, 200]
    assert hub.commit_messages(REPO_ID, "step-000010") == ["Upload llama-8b (step-000010)", "initial commit"]
    pushed = hub.files_at(REPO_ID, "step-000010")
    assert set(pushed) == {"model.safetensors", "config.json", "tokenizer.json"}
    assert pushed["model.safetensors"] == (folder / "model.safetensors").read_bytes()


def test_a_push_that_keeps_failing_is_reported_and_leaves_the_local_files_identical(hub_online, api, run_dir, caplog):
    hub = hub_online
    folder = write_checkpoint(run_dir, 10)
    before = tree_digest(run_dir)
    hub.inject(Fault("POST", r"^/api/repos/create$", 503, times=3, message="503 Service Unavailable"))
    sleep = RecordingSleep()
    with (
        caplog.at_level(logging.WARNING, logger="ilr.hub"),
        HubPusher(REPO_ID, api=api, sleep=sleep, max_retries=2) as pusher,
    ):
        pusher.push_folder(folder, revision=step_revision(10))
        (failed,) = pusher.wait()
        # The Hub is back (the fault is used up): the next push runs after the failed one and succeeds.
        pusher.push_folder(write_checkpoint(run_dir, 20), revision=step_revision(20))
        results = pusher.wait()
        failures = pusher.failures
    assert results[0] is failed
    failed, succeeded = results
    assert not failed.ok and failed.attempts == 3 and len(sleep.delays) == 2
    assert "503 Service Unavailable" in failed.error and "after 3 attempts" in failed.error
    assert f"hf upload {REPO_ID} {folder} --revision step-000010" in failed.error
    assert failures == [failed]
    assert succeeded.ok and succeeded.revision == "step-000020"
    assert set(hub.branches(REPO_ID)) == {"main", "step-000020"}
    assert "failed after 3 attempt(s)" in str(failed)
    # The retries and the failure are logged.
    assert caplog.text.count("retry") == 2 and "Push of" in caplog.text
    before.update({k: v for k, v in tree_digest(run_dir).items() if k.startswith("checkpoint-20/")})
    assert tree_digest(run_dir) == before


@pytest.mark.parametrize("case", ["no token", "foreign namespace", "missing branch"])
def test_auth_and_not_found_errors_are_not_retried_and_name_the_fix(hub_online, run_dir, tmp_path, case):
    hub = hub_online
    repo_id, token = REPO_ID, TOKEN
    if case == "no token":
        token, fix, status = False, "`hf auth login`", "401"  # `False`: send no token, not even a saved one
    elif case == "foreign namespace":
        repo_id, fix, status = "someone-else/model", "HF_TOKEN", "403"
    else:  # the branch vanishes between its creation and the upload
        hub.inject(Fault("POST", r"/preupload/", 404, headers={"X-Error-Code": "RevisionNotFound"}))
        fix, status = "check `hub_model_id`", "404"
    sleep = RecordingSleep()
    folder = write_checkpoint(run_dir, 10)
    before = tree_digest(run_dir)
    with HubPusher(repo_id, api=HfApi(endpoint=hub.url, token=token), sleep=sleep) as pusher:
        pusher.push_folder(folder, revision=step_revision(10))
        (result,) = pusher.wait()
    assert not result.ok and result.attempts == 1 and sleep.delays == []
    assert fix in result.error and repo_id in result.error and status in result.error
    assert f"hf upload {repo_id} {folder}" in result.error
    assert hub.files_at(REPO_ID, "main") == {} if case == "missing branch" else hub.repo("model", repo_id) is None
    assert tree_digest(run_dir) == before


def test_the_token_never_appears_in_messages_logs_or_reprs(hub_online, api, run_dir, caplog, tmp_path):
    hub = hub_online
    # A proxy that echoes the credentials it was sent, first in a transient error, then in a refusal.
    hub.inject(Fault("POST", r"^/api/repos/create$", 503, message=f"overloaded (Authorization: Bearer {TOKEN})"))
    hub.inject(Fault("POST", r"/commit/", 403, message=f"token {TOKEN} has no write access"))
    # Our loggers' level too: an earlier test's run may have set it from its recipe's `log_level`.
    with (
        caplog.at_level(logging.DEBUG),
        caplog.at_level(logging.DEBUG, logger="ilr.hub"),
        HubPusher(REPO_ID, token=TOKEN, api=api, sleep=RecordingSleep()) as pusher,
    ):
        pusher.push_folder(write_checkpoint(run_dir, 10), revision=step_revision(10))
        (result,) = pusher.wait()
        # Our own log records (httpcore's debug trace of the echoed headers is the client's, not ours).
        ours = [record.getMessage() for record in caplog.records if record.name.startswith("ilr")]
        text = " ".join([result.error, str(result), repr(result), repr(pusher), *ours])
    assert not result.ok and result.attempts == 2 and len(ours) == 2  # one retry warning, one failure
    assert "403 Forbidden" in result.error and "***" in result.error
    assert TOKEN not in text

    # A token that does not look like a Hub token is scrubbed too, since the pusher knows it.
    secret = "my-org-secret-value-42"
    hub.reset()
    hub.inject(Fault("POST", r"^/api/repos/create$", 401, message=f"401 Unauthorized (token={secret})"))
    secret_api = HfApi(endpoint=hub.url, token=secret)
    with HubPusher(REPO_ID, token=secret, api=secret_api, sleep=RecordingSleep()) as pusher:
        pusher.push_folder(write_checkpoint(run_dir, 20))
        (result,) = pusher.wait()
    ours = [record.getMessage() for record in caplog.records if record.name.startswith("ilr")]
    assert "401 Unauthorized" in result.error and "`hf auth login`" in result.error
    assert secret not in result.error and not any(secret in m for m in ours)

    # The one-commit push of eval cards as well: its error holds no token, nor does the chained error.
    hub.reset()
    hub.publish(REPO_ID, {"config.json": "{}"})
    hub.inject(Fault("POST", r"/commit/", 403, message=f"bad token {TOKEN}"))
    card = tmp_path / "README.md"
    card.write_text("# card")
    with pytest.raises(HubUnavailableError) as raised:
        push_files(REPO_ID, {"README.md": card}, commit_message="card", token=TOKEN)
    assert TOKEN not in str(raised.value) and raised.value.__cause__ is None and "403 Forbidden" in str(raised.value)
    assert card.read_text() == "# card" and "README.md" not in hub.files_at(REPO_ID)


def test_transient_errors_are_told_from_final_ones():
    """What the pusher retries, for errors the server cannot produce (a local timeout, DNS failure, unreadable file)."""
    assert _is_transient(TimeoutError("upload timed out"))
    assert _is_transient(httpx.ConnectError("Name or service not known"))
    assert _is_transient(ConnectionError("Connection reset by peer"))
    assert not _is_transient(PermissionError("model.safetensors"))
    assert not _is_transient(FileNotFoundError("model.safetensors"))
    assert not _is_transient(ValueError("a bug"))


def test_a_folder_rotated_away_before_its_push_is_a_reported_failure(hub_online, api, run_dir):
    gone = write_checkpoint(run_dir, 10)
    with HubPusher(REPO_ID, api=api) as pusher:
        for path in sorted(gone.parent.rglob("*"), reverse=True):  # what `save_total_limit` rotation does
            path.unlink() if path.is_file() else path.rmdir()
        gone.parent.rmdir()
        future = pusher.push_folder(gone, revision=step_revision(10))
        (result,) = pusher.wait()
    assert future.done() and not result.ok and result.attempts == 0
    assert "save_total_limit" in result.error and str(gone) in result.error
    assert hub_online.requests == []


def test_a_folder_rotated_away_after_its_push_was_queued_still_uploads_its_snapshot(
    hub_online, api, run_dir, tmp_path
):
    gate = threading.Event()
    hub_online.inject(Fault("POST", r"^/api/repos/create$", status=0, gate=gate))
    first, second = write_checkpoint(run_dir, 10), write_checkpoint(run_dir, 20)
    weights = (first / "model.safetensors").read_bytes()
    with HubPusher(REPO_ID, api=api, staging_dir=tmp_path / "staging") as pusher:
        pusher.push_folder(first, revision=step_revision(10))
        pusher.push_folder(second, revision=step_revision(20))
        shutil.rmtree(first.parent)  # rotated away while the uploads wait
        gate.set()
        results = pusher.wait()
    assert [r.ok for r in results] == [True, True]
    assert hub_online.files_at(REPO_ID, "step-000010")["model.safetensors"] == weights


def test_offline_pushes_fail_at_once_without_contacting_the_hub(hub_online, api, run_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = write_checkpoint(run_dir, 10)
    before = tree_digest(run_dir)
    sleep = RecordingSleep()
    with HubPusher(REPO_ID, api=api, sleep=sleep) as pusher:
        future = pusher.push_folder(folder, revision=step_revision(10))
        assert future.done()
        (result,) = pusher.wait()
    assert not result.ok and result.attempts == 0 and sleep.delays == []
    assert "HF_HUB_OFFLINE=1" in result.error and f"hf upload {REPO_ID} {folder}" in result.error
    assert hub_online.requests == []
    assert tree_digest(run_dir) == before


def test_ignore_patterns_are_a_parameter_and_the_defaults_match_the_trainer(hub_online, api, run_dir):
    from ilr.checkpoints import DEEPSPEED_CHECKPOINT_TAG, OPTIMIZER_NAME, RNG_STATE_NAME, SCHEDULER_NAME

    for name in (OPTIMIZER_NAME, SCHEDULER_NAME, RNG_STATE_NAME):
        assert name in DEFAULT_PUSH_IGNORE_PATTERNS and f"*/{name}" in DEFAULT_PUSH_IGNORE_PATTERNS
    engine_files = [f"{DEEPSPEED_CHECKPOINT_TAG}/global_step4/mp_rank_00_model_states.pt", "zero_to_fp32.py"]
    kept = list(
        filter_repo_objects([*engine_files, "model.safetensors"], ignore_patterns=DEFAULT_PUSH_IGNORE_PATTERNS)
    )
    assert kept == ["model.safetensors"]  # a DeepSpeed checkpoint's engine state stays local

    hub = hub_online
    folder = write_checkpoint(run_dir, 10)
    with HubPusher(REPO_ID, api=api, ignore_patterns=["*.json"]) as pusher:
        pusher.push_folder(folder, revision="only-json-ignored")  # the pusher's patterns
        pusher.push_folder(folder, revision="everything", ignore_patterns=[])
        assert all(result.ok for result in pusher.wait())
    assert set(hub.files_at(REPO_ID, "only-json-ignored")) == {"model.safetensors", "optimizer.pt", "scheduler.pt"}
    assert set(hub.files_at(REPO_ID, "everything")) == {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "optimizer.pt",
        "scheduler.pt",
    }

    with HubPusher(REPO_ID, api=api) as pusher:
        pusher.push_folder(folder.parent, revision="whole-checkpoint")  # all agents, nested state files
        assert pusher.wait()[0].ok
    assert set(hub.files_at(REPO_ID, "whole-checkpoint")) == {
        "trainer_state.json",
        "llama-8b/model.safetensors",
        "llama-8b/config.json",
        "llama-8b/tokenizer.json",
    }


def test_close_stops_new_pushes_and_reports_cancelled_ones(hub_online, api, run_dir):
    hub = hub_online
    gate = threading.Event()
    hub.inject(Fault("POST", r"^/api/repos/create$", status=0, gate=gate))
    pusher = HubPusher(REPO_ID, api=api)
    pusher.push_folder(write_checkpoint(run_dir, 10), revision=step_revision(10))
    pusher.push_folder(write_checkpoint(run_dir, 20), revision=step_revision(20))
    deadline = time.monotonic() + 10
    while not hub.requests and time.monotonic() < deadline:  # the first push has started
        time.sleep(0.01)
    staging_root = pusher._staging_root
    assert staging_root.is_dir()
    threading.Timer(0.2, gate.set).start()
    pusher.close(cancel_pending=True)
    results = pusher.wait()
    pusher.close()  # idempotent
    assert results[0].ok and not results[1].ok and "cancelled" in results[1].error
    assert set(hub.branches(REPO_ID)) == {"main", "step-000010"}
    assert not staging_root.exists()  # the pusher's own temporary staging folder is removed
    with pytest.raises(RuntimeError, match="closed"):
        pusher.push_folder(run_dir)


# ---------------------------------------------------------------------------------------------------------------------
# Model card of a trained agent
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def recipe(tmp_path) -> Path:
    path = tmp_path / "config_group1.yaml"
    path.write_text(
        "# ILR Group 1\n"
        "agents:\n"
        "  - model_name_or_path: meta-llama/Llama-3.1-8B-Instruct\n"
        "    name: llama-8b\n"
        "    hub_model_id: org/llama-8b-ilr\n"
        "  - model_name_or_path: Qwen/Qwen2.5-7B-Instruct\n"
        "    name: qwen-7b\n"
        "    hub_model_id: org/qwen-7b-ilr\n"
        "dataset_name: math_train\n"
        "method: ilr\n"
        "interaction_mode: dynamic\n"
        "calibration: true\n"
        "pad_token: <|pad|>\n"
        "max_completion_length: 1024\n"
        f"hub_token: {TOKEN}\n"
        "push_to_hub: true\n"
    )
    return path


def test_training_card_names_method_pairing_recipe_data_and_progress(recipe):
    card = build_training_card(
        model_name="llama-8b-ilr",
        base_model="meta-llama/Llama-3.1-8B-Instruct",
        agent_name="llama-8b",
        peers={"qwen-7b": "Qwen/Qwen2.5-7B-Instruct"},
        recipe_path=recipe,
        global_step=50,
        num_training_steps=200,
        repo_id=REPO_ID,
        peer_repos={"qwen-7b": "org/qwen-7b-ilr"},
    )
    text = str(card)
    # Method.
    for phrase in ("Interactive Learning for LLM Reasoning", "Idea Sharing", "Idea Analysis", "Idea Fusion"):
        assert phrase in text
    assert "**cooperates**" in text and "**competes**" in text and "IRT" in text
    assert "Perception Calibration" in text and "GRPO" in text
    # Pairing, data, progress, recipe.
    assert "| `llama-8b` (this model) | `meta-llama/Llama-3.1-8B-Instruct` | `org/llama-8b-ilr` |" in text
    assert "| `qwen-7b` | `Qwen/Qwen2.5-7B-Instruct` | [`org/qwen-7b-ilr`]" in text
    assert "`math_train`" in text and "DigitalLearningGmbH/MATH-lighteval" in text
    assert "50 of 200 optimizer steps done" in text
    assert "```yaml\n# ILR Group 1\n" in text and "interaction_mode: dynamic" in text and "pad_token: <|pad|>" in text
    assert "hub_token: <removed>" in text and TOKEN not in text
    # Metadata: a valid card header.
    data = ModelCard(text).data
    assert data.base_model == "meta-llama/Llama-3.1-8B-Instruct"
    assert data.datasets == ["DigitalLearningGmbH/MATH-lighteval"]
    assert {"ilr", "grpo", "trl"} <= set(data.tags)
    assert data.model_name == "llama-8b-ilr"


def test_training_card_from_recipe_text_and_local_files():
    card = build_training_card(
        model_name="tiny",
        base_model="/models/tiny-local",
        agent_name="a",
        peers={"b": "/models/other"},
        recipe_text=f"method: ilr\ntoken: '{TOKEN}'\nnote: pushed with {TOKEN}\n",
        data_files={"train": ["/data/train.jsonl"], "validation": "/data/val.jsonl"},
    )
    text = str(card)
    assert TOKEN not in text and "note: pushed with ***" in text and "token: <removed>" in text
    assert "Local data files (train): `train.jsonl`" in text and "(validation): `val.jsonl`" in text
    assert ModelCard(text).data.base_model is None  # a local path is no Hub base model
    with pytest.raises(ValueError, match="not both"):
        build_training_card(
            model_name="x", base_model="a/b", agent_name="a", peers={}, recipe_path="r.yaml", recipe_text="x: 1"
        )


def test_redacted_recipes_keep_their_shape_and_tokenizer_settings():
    text = (
        "agents:\n"
        f"  - hub_token: {TOKEN}\n"
        "    model_name_or_path: a/b\n"
        "wandb_api_key: abc123\n"
        "eos_token: </s>\n"
        "peer_max_tokens: 1024\n"
    )
    redacted = yaml.safe_load(redact_recipe(text))
    assert redacted == {
        "agents": [{"hub_token": "<removed>", "model_name_or_path": "a/b"}],
        "wandb_api_key": "<removed>",
        "eos_token": "</s>",
        "peer_max_tokens": 1024,
    }

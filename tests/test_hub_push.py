"""Background Hub pushes of trained agents (`ilr.hub.HubPusher`) and their model cards (`build_training_card`).

The Hub is faked at the narrowest boundary, the `huggingface_hub.HfApi` methods the pusher calls (`create_repo`,
`create_branch`, `upload_folder`); files, threads and retries are real.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import filter_repo_objects

from ilr import hub
from ilr.cards import build_training_card, redact_recipe
from ilr.hub import DEFAULT_PUSH_IGNORE_PATTERNS, HubPusher, HubUnavailableError, push_files, step_revision


REPO_ID = "org/llama-8b-ilr"
TOKEN = "hf_FAKEtoken1234567890"


# ---------------------------------------------------------------------------------------------------------------------
# A fake Hub client
# ---------------------------------------------------------------------------------------------------------------------
def http_error(status: int, message: str | None = None, headers: dict[str, str] | None = None) -> HfHubHTTPError:
    """An `HfHubHTTPError` as `huggingface_hub` raises it: with the `httpx.Response` it came from."""
    request = httpx.Request("POST", f"https://huggingface.co/api/models/{REPO_ID}/commit/main")
    response = httpx.Response(status, request=request, headers=headers)
    return HfHubHTTPError(message or f"{status} Server Error for url {request.url}", response=response)


class FakeHfApi:
    """Records every call; `upload_folder` raises the queued `failures` first, then "uploads" what it is given:
    it reads the folder (as the real client does, honouring `ignore_patterns`) and keeps the bytes, per revision."""

    def __init__(self, failures: list[BaseException] | None = None, gate: threading.Event | None = None):
        self.failures = list(failures or [])
        self.gate = gate
        self.calls: list[tuple[str, dict]] = []
        self.commits: list[dict] = []
        self.upload_threads: set[str] = set()

    def create_repo(self, repo_id, *, private=None, exist_ok=False, repo_type=None, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, "private": private, "exist_ok": exist_ok}))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, *, branch, revision=None, exist_ok=False, repo_type=None, **kwargs):
        self.calls.append(("create_branch", {"repo_id": repo_id, "branch": branch, "exist_ok": exist_ok}))

    def upload_folder(self, *, repo_id, folder_path, revision=None, commit_message=None, ignore_patterns=None, **kw):
        self.calls.append(("upload_folder", {"repo_id": repo_id, "revision": revision, "ignore": ignore_patterns}))
        self.upload_threads.add(threading.current_thread().name)
        if self.gate is not None:
            assert self.gate.wait(10), "the test never opened the gate"
        if self.failures:
            raise self.failures.pop(0)
        root = Path(folder_path)
        names = [p.relative_to(root).as_posix() for p in sorted(root.rglob("*")) if p.is_file()]
        files = {
            name: (root / name).read_bytes() for name in filter_repo_objects(names, ignore_patterns=ignore_patterns)
        }
        self.commits.append({"revision": revision or "main", "message": commit_message, "files": files})
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{len(self.commits):040x}")

    def names(self, method: str) -> list[dict]:
        return [kwargs for name, kwargs in self.calls if name == method]


class RecordingSleep:
    def __init__(self):
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def online(monkeypatch):
    """The tests run with HF_HUB_OFFLINE=1; these pretend to be online (the fake client is all they reach)."""
    monkeypatch.setattr(hub, "hub_offline", lambda: False)


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
def test_checkpoints_go_to_step_branches_in_order_and_the_final_model_to_main(online, run_dir, tmp_path):
    gate = threading.Event()
    api = FakeHfApi(gate=gate)
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

    # Queued, not pushed: push_folder returned while the (gated) upload runs in the background.
    assert pusher.pending == 4 and not futures[0].done()
    before = tree_digest(run_dir)
    gate.set()
    results = pusher.wait()
    pusher.close()

    assert [r.ok for r in results] == [True] * 4
    assert [r.revision for r in results] == ["step-000010", "step-000020", "step-000030", "main"]
    assert [r.attempts for r in results] == [1] * 4
    assert [f.result() for f in futures] == results
    assert all(r.url.startswith(f"https://huggingface.co/{REPO_ID}/commit/") for r in results)
    # One repository (private), one branch per step, none for main; uploads in the order queued, on one worker.
    assert api.names("create_repo") == [{"repo_id": REPO_ID, "private": True, "exist_ok": True}]
    assert [c["branch"] for c in api.names("create_branch")] == ["step-000010", "step-000020", "step-000030"]
    assert all(c["exist_ok"] for c in api.names("create_branch"))
    assert [c["revision"] for c in api.commits] == ["step-000010", "step-000020", "step-000030", "main"]
    assert len(api.upload_threads) == 1 and threading.current_thread().name not in api.upload_threads
    # The Hub gets the model, tokenizer and trainer state, never the optimizer/scheduler state.
    assert set(api.commits[0]["files"]) == {"model.safetensors", "config.json", "tokenizer.json", "trainer_state.json"}
    assert api.commits[1]["files"]["trainer_state.json"] == b'{"global_step": 20}'
    assert api.commits[0]["message"] == "Checkpoint step 10"
    # The final push carries the card in place of the folder's README.
    assert api.commits[3]["files"] == {"model.safetensors": b"final weights", "README.md": card.read_bytes()}
    # Nothing local changed, and the snapshots are gone.
    assert tree_digest(run_dir) == before
    assert (final / "README.md").read_text() == "the card save_pretrained writes"
    assert not any(staging.iterdir())


def test_transient_errors_are_retried_with_exponential_backoff(online, run_dir):
    failures = [
        http_error(503),
        ConnectionError("Connection reset by peer"),
        http_error(429, "429 Too Many Requests", headers={"Retry-After": "30"}),
        httpx.ConnectError("Name or service not known"),
        TimeoutError("upload timed out"),
    ]
    api, sleep = FakeHfApi(failures=failures), RecordingSleep()
    with HubPusher(REPO_ID, api=api, sleep=sleep, max_retries=5, backoff=2.0) as pusher:
        pusher.push_folder(write_checkpoint(run_dir, 10), revision=step_revision(10))
        (result,) = pusher.wait()
    assert result.ok and result.attempts == 6
    assert sleep.delays == [2.0, 4.0, 30.0, 16.0, 32.0]  # doubling; the 429's Retry-After when longer
    assert len(api.commits) == 1
    # The repository and the branch are created once, not once per attempt.
    assert len(api.names("create_repo")) == 1 and len(api.names("create_branch")) == 1

    api, sleep = FakeHfApi(failures=[http_error(502) for _ in range(4)]), RecordingSleep()
    with HubPusher(REPO_ID, api=api, sleep=sleep, max_retries=4, backoff=2.0, max_backoff=5.0) as pusher:
        pusher.push_folder(write_checkpoint(run_dir, 20))
        assert pusher.wait()[0].ok
    assert sleep.delays == [2.0, 4.0, 5.0, 5.0]  # capped


def test_a_push_that_keeps_failing_is_reported_and_leaves_the_local_files_identical(online, run_dir, caplog):
    folder = write_checkpoint(run_dir, 10)
    before = tree_digest(run_dir)
    api, sleep = FakeHfApi(failures=[http_error(503, "503 Service Unavailable") for _ in range(10)]), RecordingSleep()
    with (
        caplog.at_level(logging.WARNING, logger="ilr.hub"),
        HubPusher(REPO_ID, api=api, sleep=sleep, max_retries=2) as pusher,
    ):
        pusher.push_folder(folder, revision=step_revision(10))
        (failed,) = pusher.wait()
        # The Hub is back: the next push runs after the failed one and succeeds.
        api.failures = []
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
    assert "failed after 3 attempt(s)" in str(failed)
    # The retries and the failure are logged.
    assert caplog.text.count("retry") == 2 and "Push of" in caplog.text
    before.update({k: v for k, v in tree_digest(run_dir).items() if k.startswith("checkpoint-20/")})
    assert tree_digest(run_dir) == before


@pytest.mark.parametrize(
    ("status", "fix"),
    [(401, "`hf auth login`"), (403, "HF_TOKEN"), (404, "check `hub_model_id`")],
)
def test_auth_and_not_found_errors_are_not_retried_and_name_the_fix(online, run_dir, status, fix):
    api, sleep = FakeHfApi(failures=[http_error(status, f"{status} Client Error")]), RecordingSleep()
    with HubPusher(REPO_ID, api=api, sleep=sleep) as pusher:
        pusher.push_folder(write_checkpoint(run_dir, 10), revision=step_revision(10))
        (result,) = pusher.wait()
    assert not result.ok and result.attempts == 1 and sleep.delays == []
    assert fix in result.error and REPO_ID in result.error and f"{status} Client Error" in result.error


def test_the_token_never_appears_in_messages_logs_or_reprs(online, run_dir, caplog, monkeypatch):
    failures = [
        ConnectionError(f"Connection aborted while sending 'Authorization: Bearer {TOKEN}'"),
        http_error(403, f"403 Forbidden: token {TOKEN} has no write access to {REPO_ID}"),
    ]
    api = FakeHfApi(failures=failures)
    with caplog.at_level(logging.DEBUG), HubPusher(REPO_ID, token=TOKEN, api=api, sleep=RecordingSleep()) as pusher:
        pusher.push_folder(write_checkpoint(run_dir, 10), revision=step_revision(10))
        (result,) = pusher.wait()
        text = " ".join([result.error, str(result), repr(result), repr(pusher), caplog.text])
    assert not result.ok and result.attempts == 2
    assert "403 Forbidden" in result.error and "***" in result.error
    assert TOKEN not in text

    # A token that does not look like a Hub token is scrubbed too, since the pusher knows it.
    secret = "my-org-secret-value-42"
    api = FakeHfApi(failures=[http_error(401, f"401 Unauthorized (token={secret})")])
    with HubPusher(REPO_ID, token=secret, api=api, sleep=RecordingSleep()) as pusher:
        pusher.push_folder(write_checkpoint(run_dir, 20))
        (result,) = pusher.wait()
    assert secret not in result.error and "token=***" in result.error and secret not in caplog.text

    # The one-commit push of eval cards as well: its error holds no token, nor does the chained error.
    import huggingface_hub

    class LeakyApi:
        def __init__(self, token=None):
            self.token = token

        def create_commit(self, repo_id, operations, **kwargs):
            raise http_error(403, f"403 Forbidden: bad token {self.token}")

    monkeypatch.setattr(huggingface_hub, "HfApi", LeakyApi)
    card = run_dir / "README.md"
    card.write_text("# card")
    with pytest.raises(HubUnavailableError) as raised:
        push_files(REPO_ID, {"README.md": card}, commit_message="card", token=TOKEN)
    assert TOKEN not in str(raised.value) and raised.value.__cause__ is None and "403 Forbidden" in str(raised.value)


def test_a_folder_rotated_away_before_its_push_is_a_reported_failure(online, run_dir):
    api = FakeHfApi()
    gone = write_checkpoint(run_dir, 10)
    with HubPusher(REPO_ID, api=api) as pusher:
        for path in sorted(gone.parent.rglob("*"), reverse=True):  # what `save_total_limit` rotation does
            path.unlink() if path.is_file() else path.rmdir()
        gone.parent.rmdir()
        future = pusher.push_folder(gone, revision=step_revision(10))
        (result,) = pusher.wait()
    assert future.done() and not result.ok and result.attempts == 0
    assert "save_total_limit" in result.error and str(gone) in result.error
    assert api.calls == []


def test_a_folder_rotated_away_after_its_push_was_queued_still_uploads_its_snapshot(online, run_dir, tmp_path):
    import shutil

    gate = threading.Event()
    api = FakeHfApi(gate=gate)
    first, second = write_checkpoint(run_dir, 10), write_checkpoint(run_dir, 20)
    weights = (first / "model.safetensors").read_bytes()
    with HubPusher(REPO_ID, api=api, staging_dir=tmp_path / "staging") as pusher:
        pusher.push_folder(first, revision=step_revision(10))
        pusher.push_folder(second, revision=step_revision(20))
        shutil.rmtree(first.parent)  # rotated away while the uploads wait
        gate.set()
        results = pusher.wait()
    assert [r.ok for r in results] == [True, True]
    assert api.commits[0]["files"]["model.safetensors"] == weights


def test_offline_pushes_fail_at_once_without_contacting_the_hub(run_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = write_checkpoint(run_dir, 10)
    before = tree_digest(run_dir)
    api, sleep = FakeHfApi(), RecordingSleep()
    with HubPusher(REPO_ID, api=api, sleep=sleep) as pusher:
        future = pusher.push_folder(folder, revision=step_revision(10))
        assert future.done()
        (result,) = pusher.wait()
    assert not result.ok and result.attempts == 0 and sleep.delays == []
    assert "HF_HUB_OFFLINE=1" in result.error and f"hf upload {REPO_ID} {folder}" in result.error
    assert api.calls == []
    assert tree_digest(run_dir) == before


def test_ignore_patterns_are_a_parameter_and_the_defaults_match_the_trainer(online, run_dir):
    from huggingface_hub.utils import filter_repo_objects

    from ilr.trainer import DEEPSPEED_CHECKPOINT_TAG, OPTIMIZER_NAME, RNG_STATE_NAME, SCHEDULER_NAME

    for name in (OPTIMIZER_NAME, SCHEDULER_NAME, RNG_STATE_NAME):
        assert name in DEFAULT_PUSH_IGNORE_PATTERNS and f"*/{name}" in DEFAULT_PUSH_IGNORE_PATTERNS
    engine_files = [f"{DEEPSPEED_CHECKPOINT_TAG}/global_step4/mp_rank_00_model_states.pt", "zero_to_fp32.py"]
    kept = list(
        filter_repo_objects([*engine_files, "model.safetensors"], ignore_patterns=DEFAULT_PUSH_IGNORE_PATTERNS)
    )
    assert kept == ["model.safetensors"]  # a DeepSpeed checkpoint's engine state stays local

    api = FakeHfApi()
    folder = write_checkpoint(run_dir, 10)
    with HubPusher(REPO_ID, api=api, ignore_patterns=["*.json"]) as pusher:
        pusher.push_folder(folder)  # the pusher's patterns
        pusher.push_folder(folder, ignore_patterns=[])  # everything
        pusher.push_folder(folder.parent)  # a whole checkpoint (all agents), nested state files
        assert all(result.ok for result in pusher.wait())
    assert set(api.commits[0]["files"]) == {"model.safetensors", "optimizer.pt", "scheduler.pt"}
    assert set(api.commits[1]["files"]) == {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "optimizer.pt",
        "scheduler.pt",
    }
    assert api.names("upload_folder")[0]["ignore"] == ["*.json"]

    api = FakeHfApi()
    with HubPusher(REPO_ID, api=api) as pusher:
        pusher.push_folder(folder.parent)
        pusher.wait()
    assert set(api.commits[0]["files"]) == {
        "trainer_state.json",
        "llama-8b/model.safetensors",
        "llama-8b/config.json",
        "llama-8b/tokenizer.json",
    }


def test_close_stops_new_pushes_and_reports_cancelled_ones(online, run_dir):
    gate = threading.Event()
    api = FakeHfApi(gate=gate)
    pusher = HubPusher(REPO_ID, api=api)
    pusher.push_folder(write_checkpoint(run_dir, 10))
    pusher.push_folder(write_checkpoint(run_dir, 20))
    deadline = time.monotonic() + 10
    while not api.names("upload_folder") and time.monotonic() < deadline:  # the first push has started
        time.sleep(0.01)
    staging_root = pusher._staging_root
    assert staging_root.is_dir()
    threading.Timer(0.2, gate.set).start()
    pusher.close(cancel_pending=True)
    results = pusher.wait()
    pusher.close()  # idempotent
    assert results[0].ok and not results[1].ok and "cancelled" in results[1].error
    assert len(api.commits) == 1
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

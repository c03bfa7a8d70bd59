"""Hugging Face Hub I/O: pull released checkpoints (revision-pinned), push eval cards, push trained agents.

Everything that talks to the Hub goes through here, so that offline mode is checked in one place: with
`HF_HUB_OFFLINE=1` a model that is not in the local cache fails at once with a message naming the flag and the local
path alternative, instead of stalling on the network. Pushes never touch local files: a card is written to disk first
and a failed push leaves it there.

Training pushes ([`HubPusher`]) run in the background, one ordered queue per agent repository, with retries and
exponential backoff on transient errors (5xx, 429, connection errors). Each checkpoint goes to a branch named after its
step (`step-000050`, as open-r1 does), the final model to `main`. What is uploaded is snapshotted (hard links) when
the push is queued, so a checkpoint rotated away by `save_total_limit` afterwards still uploads, and the local folder
is only ever read. No message this module logs, stores or raises contains the Hub token.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ilr.offline import hub_offline


__all__ = [
    "DEFAULT_PUSH_IGNORE_PATTERNS",
    "HubPusher",
    "HubUnavailableError",
    "PushResult",
    "download_model",
    "hub_offline",
    "push_files",
    "resolve_model",
    "scrub_token",
    "step_revision",
]

logger = logging.getLogger(__name__)

# Training state a checkpoint needs to resume but a Hub model repository does not: the trainer's `OPTIMIZER_NAME`,
# `SCHEDULER_NAME` and `RNG_STATE_NAME` (a test checks they agree), at the top of the pushed folder or one level down;
# under DeepSpeed, the engine's own checkpoint (`DEEPSPEED_CHECKPOINT_TAG`: weights + optimizer partitions) and the
# conversion scripts it writes next to it.
_TRAINING_STATE_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "deepspeed/*", "zero_to_*.py")
DEFAULT_PUSH_IGNORE_PATTERNS = tuple(pattern for name in _TRAINING_STATE_FILES for pattern in (name, f"*/{name}"))
# Hub user access tokens (`hf_...`) and bearer headers, scrubbed from every message even when the token in use is not
# known here (a saved login).
_TOKEN_PATTERN = re.compile(r"\bhf_[A-Za-z0-9]{16,}|(?<=Bearer )\S+")


class HubUnavailableError(ConnectionError):
    """The Hub cannot be reached (offline mode, no network, missing repository). The message names the fix."""


def scrub_token(text: str, token: str | None = None) -> str:
    """
    Remove Hub tokens from a text before it is logged, stored or raised.

    Args:
        text (`str`):
            Any message, e.g. `str(error)` of a `huggingface_hub` error.
        token (`str`, *optional*):
            The token in use; anything that looks like a Hub token (`hf_...`, a bearer header) is removed as well.

    Returns:
        `str`: The text with every token replaced by `***`.
    """
    if token:
        text = text.replace(token, "***")
    return _TOKEN_PATTERN.sub("***", text)


def _error_line(error: BaseException, token: str | None = None) -> str:
    """The first line of an error's message (its type when it has none), without any token."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return scrub_token(lines[0] if lines else type(error).__name__, token)


def _offline_message(repo_id: str, revision: str | None) -> str:
    at = f"@{revision}" if revision else ""
    return (
        f"cannot download {repo_id}{at}: HF_HUB_OFFLINE=1 is set and it is not in the local cache. Pass a local "
        "model folder instead (`--model /path/to/model`, downloaded earlier with `ilr download` on a connected "
        "machine), or unset HF_HUB_OFFLINE."
    )


def download_model(
    repo_id: str,
    *,
    revision: str | None = None,
    local_dir: str | os.PathLike | None = None,
    allow_patterns: Sequence[str] | None = None,
    token: str | None = None,
    max_retries: int = 3,
    backoff: float = 2.0,
) -> tuple[str, str | None]:
    """
    Download a model snapshot from the Hub, pinned to one commit; an interrupted download resumes.

    The revision (branch, tag or commit, `main` by default) is resolved to its commit sha first, and exactly that
    commit is downloaded, so the reported revision is the one whose weights were used. Offline, the local cache is
    used when it has the revision, otherwise a `HubUnavailableError` is raised at once.

    Args:
        repo_id (`str`):
            Hub model id, `org/name`.
        revision (`str`, *optional*):
            Branch, tag or commit sha; `main` when not given.
        local_dir (`str` or `os.PathLike`, *optional*):
            Download into this folder (plain files) instead of the Hugging Face cache.
        allow_patterns (`Sequence[str]`, *optional*):
            Only files matching these glob patterns (e.g. one GGUF file of a repository with many).
        token (`str`, *optional*):
            Hub token for private or gated repositories; the saved login is used when not given.
        max_retries (`int`, *optional*, defaults to `3`):
            Retries after a transient error (5xx, 429, timeout, lost connection), each resuming the files already
            downloaded; `huggingface_hub` retries some requests itself, but not a file download answered with a 5xx.
        backoff (`float`, *optional*, defaults to `2.0`):
            Seconds before the first retry, doubled at each retry.

    Returns:
        `tuple[str, str | None]`: The local folder and the commit sha (`None` when only a cached copy was found
        offline and its sha cannot be told).

    Raises:
        `HubUnavailableError`: offline without a cached copy, or the repository/revision cannot be reached.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = list(allow_patterns) if allow_patterns else None
    if hub_offline():
        try:
            folder = snapshot_download(
                repo_id, revision=revision, local_dir=local_dir, allow_patterns=patterns, local_files_only=True
            )
        except (LocalEntryNotFoundError, OSError, ValueError) as error:
            raise HubUnavailableError(_offline_message(repo_id, revision)) from error
        # In the cache the snapshot folder is named after its commit; a local_dir copy does not say.
        sha = Path(folder).name if local_dir is None else None
        return folder, sha
    api = HfApi(token=token)
    sha = None
    try:
        for attempt in range(max_retries + 1):
            try:
                sha = sha or api.model_info(repo_id, revision=revision).sha
                folder = snapshot_download(
                    repo_id, revision=sha, local_dir=local_dir, allow_patterns=patterns, token=token
                )
                break
            except Exception as error:
                if attempt == max_retries or not _is_transient(error):
                    raise
                delay = backoff * 2**attempt
                logger.warning(
                    "Download of %s@%s interrupted (%s); resuming in %.0f s (retry %d/%d).",
                    repo_id,
                    revision or "main",
                    _error_line(error, token),
                    delay,
                    attempt + 1,
                    max_retries,
                )
                time.sleep(delay)
    except RepositoryNotFoundError as error:
        raise HubUnavailableError(
            f"{repo_id} is not a Hub model repository (or it is private: log in with `hf auth login`). For a model "
            "on disk pass its folder path."
        ) from error
    except RevisionNotFoundError as error:
        raise HubUnavailableError(
            f"{repo_id} has no revision {revision!r}: pass one of its branches or tags ({_refs_of(api, repo_id)}) "
            "or a commit sha."
        ) from error
    except (HfHubHTTPError, OSError) as error:
        raise HubUnavailableError(
            f"cannot download {repo_id}@{revision or 'main'}: {error}".splitlines()[0]
        ) from error
    logger.info("Downloaded %s@%s to %s", repo_id, sha, folder)
    return folder, sha


def _refs_of(api: Any, repo_id: str) -> str:
    """The branch and tag names of a repository, for an error message (what the listing failure was, if it fails)."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        refs = api.list_repo_refs(repo_id)
    except (HfHubHTTPError, OSError) as error:
        return f"could not list them: {_error_line(error)}"
    names = [ref.name for ref in [*refs.branches, *refs.tags]]
    return ", ".join(sorted(names, key=lambda name: (name != "main", name))) or "none"


def resolve_model(name_or_path: str, *, revision: str | None = None, **kwargs) -> tuple[str, str | None]:
    """
    A local folder for a model given as a path or a Hub id: an existing path is used as is, a Hub id is downloaded
    with [`download_model`].

    Args:
        name_or_path (`str`):
            Local folder, or Hub id `org/name`.
        revision (`str`, *optional*):
            Hub revision; ignored (with a warning) for a local folder.
        **kwargs:
            Passed to [`download_model`].

    Returns:
        `tuple[str, str | None]`: The local folder and the commit sha (`None` for a local folder).
    """
    if os.path.exists(name_or_path):
        if revision:
            logger.warning("`revision=%s` is ignored: %s is a local folder.", revision, name_or_path)
        return name_or_path, None
    if name_or_path.count("/") != 1 or name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model {name_or_path!r} is neither an existing folder nor a Hub id `org/name`.")
    return download_model(name_or_path, revision=revision, **kwargs)


def push_files(
    repo_id: str,
    files: dict[str, str | os.PathLike],
    *,
    commit_message: str,
    token: str | None = None,
    create_pr: bool = False,
    revision: str | None = None,
) -> str:
    """
    Upload local files to a Hub model repository in one commit (e.g. an eval card and its chart).

    The repository must exist (a model pushed by training); nothing is created implicitly. Local files are only read.

    Args:
        repo_id (`str`):
            Hub model id, `org/name`.
        files (`dict[str, str | os.PathLike]`):
            Path in the repository -> local file.
        commit_message (`str`):
            Commit title.
        token (`str`, *optional*):
            Hub token with write access; the saved login is used when not given.
        create_pr (`bool`, *optional*, defaults to `False`):
            Open a pull request instead of committing to the branch.
        revision (`str`, *optional*):
            Branch to commit to; `main` when not given.

    Returns:
        `str`: URL of the commit (or pull request).

    Raises:
        `HubUnavailableError`: offline, or the push failed; the local files are untouched.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    if hub_offline():
        raise HubUnavailableError(
            f"cannot push to {repo_id}: HF_HUB_OFFLINE=1 is set. The files stay on disk "
            f"({', '.join(str(p) for p in files.values())}); unset HF_HUB_OFFLINE and push again."
        )
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files.items()]
    try:
        info = HfApi(token=token).create_commit(
            repo_id, operations, commit_message=commit_message, create_pr=create_pr, revision=revision
        )
    except (HfHubHTTPError, OSError) as error:
        # `from None`: the chained error's own message could carry the token into a traceback.
        raise HubUnavailableError(
            f"push to {repo_id} failed ({_error_line(error, token)}); the files stay on disk: "
            f"{', '.join(str(p) for p in files.values())}."
        ) from None
    return info.pr_url or info.commit_url


# ---------------------------------------------------------------------------------------------------------------------
# Background pushes of trained agents
# ---------------------------------------------------------------------------------------------------------------------
def step_revision(step: int) -> str:
    """
    The Hub branch of a checkpoint: `step-000050` for step 50 (zero-padded, so branches sort by step).

    Args:
        step (`int`):
            The training step of the checkpoint.

    Returns:
        `str`: The branch name.
    """
    return f"step-{step:06d}"


@dataclass
class PushResult:
    """
    The outcome of one background push. Messages never contain the token.

    Args:
        repo_id (`str`):
            Hub model id the folder was pushed to.
        revision (`str`):
            Branch pushed to (`main` or a step branch).
        folder (`str`):
            The local folder that was pushed (never modified by the push).
        ok (`bool`):
            Whether the upload succeeded.
        url (`str`, *optional*):
            URL of the commit, when `ok`.
        error (`str`, *optional*):
            What went wrong and how to fix it, when not `ok`.
        attempts (`int`, *optional*, defaults to `0`):
            Upload attempts made (0 when the push failed before contacting the Hub: offline, folder gone).
    """

    repo_id: str
    revision: str
    folder: str
    ok: bool
    url: str | None = None
    error: str | None = None
    attempts: int = 0

    def __str__(self) -> str:
        target = f"{self.repo_id}@{self.revision}"
        if self.ok:
            return f"pushed {self.folder} to {target} ({self.url})"
        return f"push of {self.folder} to {target} failed after {self.attempts} attempt(s): {self.error}"


@dataclass
class _QueuedPush:
    future: Future
    folder: Path
    revision: str
    staged: Path | None


def _http_status(error: BaseException) -> int | None:
    return getattr(getattr(error, "response", None), "status_code", None)


def _is_transient(error: BaseException) -> bool:
    """Whether a failed upload is worth retrying: server errors, rate limits, timeouts and connection errors."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(error, HfHubHTTPError):
        status = _http_status(error)
        return status is None or status in (408, 429) or status >= 500
    if isinstance(error, (OfflineModeIsEnabled, FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return False
    if isinstance(error, PermissionError):  # a local file that cannot be read: retrying will not help
        return False
    if isinstance(error, (OSError, TimeoutError)):  # includes ConnectionError and requests' errors
        return True
    try:
        import httpx
    except ImportError:  # pragma: no cover - huggingface_hub depends on httpx
        return False
    return isinstance(error, httpx.TransportError)


class HubPusher:
    """
    Background, ordered, retrying uploads of an agent's folders to one Hub model repository.

    One pusher per agent (`hub_model_id`), one worker thread per pusher, so its pushes reach the Hub in the order they
    were queued. [`push_folder`] snapshots the files to upload (hard links into a staging folder, a copy where links
    are impossible) and returns at once; the worker creates the repository (once), the branch (once per revision),
    and uploads the snapshot with `upload_folder`. Transient errors (5xx, 429, timeouts, connection errors) are
    retried with exponential backoff; authentication and not-found errors fail at once with the fix. A failed push is
    recorded, never raised: collect the outcomes with [`wait`] (or [`failures`]) at the end of training. The local
    folder is only ever read.

    Args:
        repo_id (`str`):
            Hub model id of the agent, `org/name` (its `hub_model_id`).
        token (`str`, *optional*):
            Hub token with write access; the saved login (`hf auth login`) or `HF_TOKEN` when not given. It never
            appears in a log, result or error message.
        private (`bool`, *optional*, defaults to `False`):
            Create the repository as private (an existing repository keeps its visibility).
        max_retries (`int`, *optional*, defaults to `5`):
            Retries of a push after a transient error (so at most `max_retries + 1` attempts).
        backoff (`float`, *optional*, defaults to `2.0`):
            Seconds before the first retry; doubled at each retry (a 429's `Retry-After` is honoured when longer).
        max_backoff (`float`, *optional*, defaults to `60.0`):
            Longest wait between two attempts.
        ignore_patterns (`Sequence[str]`, *optional*, defaults to `DEFAULT_PUSH_IGNORE_PATTERNS`):
            Glob patterns (as `upload_folder`'s) of files never uploaded: by default the optimizer, scheduler and RNG
            states, which only resuming needs.
        staging_dir (`str` or `os.PathLike`, *optional*):
            Where snapshots are staged until uploaded (each removed after its push). Put it on the checkpoints' file
            system (e.g. `<output_dir>/.hub_staging`, outside any `checkpoint-*` folder) so snapshots are free hard
            links; a private temporary folder when not given (copies when it is on another file system).
        api (`huggingface_hub.HfApi`, *optional*):
            The Hub client; `HfApi(token=token)` when not given (tests pass one pointed at their Hub server).
        sleep (`Callable[[float], None]`, *optional*, defaults to `time.sleep`):
            Waits between attempts.
    """

    def __init__(
        self,
        repo_id: str,
        *,
        token: str | None = None,
        private: bool = False,
        max_retries: int = 5,
        backoff: float = 2.0,
        max_backoff: float = 60.0,
        ignore_patterns: Sequence[str] = DEFAULT_PUSH_IGNORE_PATTERNS,
        staging_dir: str | os.PathLike | None = None,
        api: Any | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if max_retries < 0 or backoff < 0 or max_backoff < 0:
            raise ValueError(
                f"`max_retries`, `backoff` and `max_backoff` must be >= 0 (got {max_retries}, {backoff}, "
                f"{max_backoff})."
            )
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi(token=token)
        self.repo_id = repo_id
        self.private = private
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.ignore_patterns = list(ignore_patterns)
        self._token = token
        self._api = api
        self._sleep = sleep
        self._staging_root = Path(staging_dir) if staging_dir is not None else None
        self._owns_staging_root = staging_dir is None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"hub-push-{repo_id.split('/')[-1]}")
        self._queue: list[_QueuedPush] = []
        self._lock = threading.Lock()
        self._repo_created = False
        self._branches: set[str] = set()
        self._warned_copy = False
        self._closed = False

    def __repr__(self) -> str:  # no token, no api (whose attributes hold it)
        return f"HubPusher(repo_id={self.repo_id!r}, private={self.private}, queued={len(self._queue)})"

    def __enter__(self) -> HubPusher:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # Public API --------------------------------------------------------------------------------------------------
    def push_folder(
        self,
        folder: str | os.PathLike,
        *,
        revision: str | None = None,
        commit_message: str | None = None,
        ignore_patterns: Sequence[str] | None = None,
        extra_files: Mapping[str, str | os.PathLike] | None = None,
    ) -> Future:
        """
        Queue an upload of a folder (a checkpoint's agent folder, or the final model) and return at once.

        The files are snapshotted now, so the folder may be rotated away or rewritten afterwards. A folder that is
        already gone, offline mode, or a later upload failure gives a failed [`PushResult`], never an exception.

        Args:
            folder (`str` or `os.PathLike`):
                Local folder whose files go to the root of the repository.
            revision (`str`, *optional*):
                Branch to commit to, created from `main` when missing (e.g. [`step_revision`]`(step)`); `main` when
                not given.
            commit_message (`str`, *optional*):
                Commit title; `Upload <folder name> (<revision>)` when not given.
            ignore_patterns (`Sequence[str]`, *optional*):
                Glob patterns of files not to upload; the pusher's `ignore_patterns` when not given.
            extra_files (`Mapping[str, str | os.PathLike]`, *optional*):
                More files, path in the repository -> local file; they replace folder files of the same path (e.g.
                `{"README.md": card, "trainer_state.json": checkpoint / "trainer_state.json"}`).

        Returns:
            `concurrent.futures.Future`: Resolves to the [`PushResult`]; [`wait`] collects them all.
        """
        if self._closed:
            raise RuntimeError(f"The HubPusher of {self.repo_id} is closed: create a new one to push {folder}.")
        folder = Path(folder)
        revision = revision or "main"
        patterns = self.ignore_patterns if ignore_patterns is None else list(ignore_patterns)
        commit_message = commit_message or f"Upload {folder.name} ({revision})"
        if hub_offline():
            return self._record_failure(
                folder,
                revision,
                f"HF_HUB_OFFLINE=1 is set, so nothing was pushed; the files stay in {folder}. Unset HF_HUB_OFFLINE "
                f"and upload them with `hf upload {self.repo_id} {folder} --revision {revision}`.",
            )
        try:
            staged = self._stage(folder, patterns, extra_files or {})
        except OSError as error:
            return self._record_failure(
                folder,
                revision,
                f"{folder} cannot be read for upload ({self._scrub(_error_line(error))}): it was removed or changed "
                "before its push was queued (a checkpoint rotated away by `save_total_limit`?), so nothing was "
                "pushed. Keep more checkpoints or push them as they are saved.",
            )
        future = self._executor.submit(self._push, folder, staged, revision, commit_message, patterns)
        with self._lock:
            self._queue.append(_QueuedPush(future, folder, revision, staged))
        return future

    def wait(self, timeout: float | None = None) -> list[PushResult]:
        """
        Block until every queued push has finished (or `timeout` has passed).

        Args:
            timeout (`float`, *optional*):
                Seconds to wait at most; no limit when not given.

        Returns:
            `list[PushResult]`: The finished pushes, in the order they were queued (those still running after
            `timeout` are left out and logged).
        """
        with self._lock:
            queue = list(self._queue)
        # Only the unfinished ones: `wait` would block on a future cancelled by `shutdown` (never notified).
        _, running = wait_futures([item.future for item in queue if not item.future.done()], timeout=timeout)
        if running:
            logger.warning("%d push(es) to %s still running after %s s.", len(running), self.repo_id, timeout)
        return [self._result(item) for item in queue if item.future not in running]

    @property
    def failures(self) -> list[PushResult]:
        """`list[PushResult]`: The pushes that have failed so far (finished ones only; does not wait)."""
        with self._lock:
            queue = list(self._queue)
        return [result for item in queue if item.future.done() and not (result := self._result(item)).ok]

    @property
    def pending(self) -> int:
        """`int`: Pushes queued or running."""
        with self._lock:
            return sum(not item.future.done() for item in self._queue)

    def close(self, wait: bool = True, *, cancel_pending: bool = False) -> None:
        """
        Stop accepting pushes and release the worker.

        Args:
            wait (`bool`, *optional*, defaults to `True`):
                Wait for the queued pushes to finish.
            cancel_pending (`bool`, *optional*, defaults to `False`):
                Drop the pushes that have not started (reported as failed by [`wait`]).
        """
        self._closed = True
        self._executor.shutdown(wait=wait, cancel_futures=cancel_pending)
        with self._lock:
            queue = list(self._queue)
        for item in queue:
            if item.future.cancelled():
                with contextlib.suppress(RuntimeError):  # already notified by an earlier `close`
                    item.future.set_running_or_notify_cancel()  # wakes anyone waiting on it
                if item.staged is not None:
                    shutil.rmtree(item.staged, ignore_errors=True)
        if wait and self._owns_staging_root and self._staging_root is not None:
            shutil.rmtree(self._staging_root, ignore_errors=True)

    # Internals ---------------------------------------------------------------------------------------------------
    def _scrub(self, text: str) -> str:
        return scrub_token(text, self._token)

    def _record_failure(self, folder: Path, revision: str, message: str) -> Future:
        result = PushResult(self.repo_id, revision, str(folder), ok=False, error=self._scrub(message), attempts=0)
        logger.error("Push to %s@%s failed: %s", self.repo_id, revision, result.error)
        future: Future = Future()
        future.set_result(result)
        with self._lock:
            self._queue.append(_QueuedPush(future, folder, revision, None))
        return future

    def _result(self, item: _QueuedPush) -> PushResult:
        if item.future.cancelled():
            message = "cancelled before it started (the pusher was closed with `cancel_pending=True`)"
            return PushResult(self.repo_id, item.revision, str(item.folder), ok=False, error=message)
        return item.future.result()

    def _stage(self, folder: Path, patterns: list[str], extra_files: Mapping[str, str | os.PathLike]) -> Path:
        """Snapshot the files to upload into a fresh staging folder: hard links, or copies across file systems."""
        from huggingface_hub.utils import filter_repo_objects

        if not folder.is_dir():
            raise FileNotFoundError(f"No such folder: '{folder}'")
        if self._staging_root is None:
            self._staging_root = Path(tempfile.mkdtemp(prefix="ilr-hub-staging-"))
        self._staging_root.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=f"{folder.name}-", dir=self._staging_root))
        try:
            files = {path.relative_to(folder).as_posix(): path for path in folder.rglob("*") if not path.is_dir()}
            for relative in filter_repo_objects(sorted(files), ignore_patterns=patterns or None):
                self._snapshot(files[relative], staged / relative)
            for path_in_repo, source in extra_files.items():
                target = staged / path_in_repo
                if target.exists():
                    target.unlink()
                self._snapshot(Path(source), target)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        return staged

    def _snapshot(self, source: Path, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except FileNotFoundError:
            raise
        except OSError:  # another file system, or links not supported: copy
            if not self._warned_copy:
                self._warned_copy = True
                logger.warning(
                    "Copying (not linking) the files pushed to %s: the staging folder %s is on another file system. "
                    "Pass a `staging_dir` next to the checkpoints to avoid the copies.",
                    self.repo_id,
                    self._staging_root,
                )
            shutil.copy2(source, target)

    def _upload_once(self, staged: Path, revision: str, commit_message: str, patterns: list[str]) -> str:
        if not self._repo_created:
            self._api.create_repo(self.repo_id, private=self.private, exist_ok=True, repo_type="model")
            self._repo_created = True
        if revision != "main" and revision not in self._branches:
            self._api.create_branch(self.repo_id, branch=revision, exist_ok=True, repo_type="model")
            self._branches.add(revision)
        info = self._api.upload_folder(
            repo_id=self.repo_id,
            folder_path=str(staged),
            revision=revision,
            commit_message=commit_message,
            ignore_patterns=patterns or None,
            repo_type="model",
        )
        return getattr(info, "commit_url", None) or str(info)

    def _delay(self, attempt: int, error: BaseException) -> float:
        delay = self.backoff * 2 ** (attempt - 1)
        response = getattr(error, "response", None)
        retry_after = getattr(response, "headers", {}).get("retry-after") if response is not None else None
        if retry_after is not None and str(retry_after).strip().isdigit():
            delay = max(delay, float(retry_after))
        return min(delay, self.max_backoff)

    def _failure_message(self, error: BaseException, folder: Path, revision: str, attempts: int) -> str:
        line = self._scrub(_error_line(error))
        status = _http_status(error)
        kept = (
            f"the files stay in {folder}; upload them with `hf upload {self.repo_id} {folder} --revision {revision}`"
        )
        if status in (401, 403):
            return (
                f"the Hub refused the push ({line}): log in with a token that has write access (`hf auth login`, "
                f"or set HF_TOKEN) and check that `hub_model_id` {self.repo_id!r} is in a namespace you can write "
                f"to; {kept}."
            )
        if status == 404:
            return (
                f"not found on the Hub ({line}): check `hub_model_id` {self.repo_id!r} (an `org/name` you can "
                f"create repositories in); {kept}."
            )
        if isinstance(error, (FileNotFoundError, NotADirectoryError)):
            return f"a staged file vanished before the upload ({line}); nothing was pushed; {kept}."
        retried = f" after {attempts} attempts" if attempts > 1 else ""
        return f"{type(error).__name__}{retried}: {line}; {kept}."

    def _push(self, folder: Path, staged: Path, revision: str, commit_message: str, patterns: list[str]) -> PushResult:
        """The worker: upload one snapshot, retrying transient errors; always returns a result, never raises."""
        attempts = 0
        try:
            while True:
                attempts += 1
                try:
                    url = self._upload_once(staged, revision, commit_message, patterns)
                except Exception as error:  # any failure is reported, never raised in the worker
                    if _is_transient(error) and attempts <= self.max_retries:
                        delay = self._delay(attempts, error)
                        logger.warning(
                            "Push of %s to %s@%s failed (%s); retry %d/%d in %.1f s.",
                            folder,
                            self.repo_id,
                            revision,
                            self._scrub(_error_line(error)),
                            attempts,
                            self.max_retries,
                            delay,
                        )
                        self._sleep(delay)
                        continue
                    message = self._scrub(self._failure_message(error, folder, revision, attempts))
                    logger.error("Push of %s to %s@%s failed: %s", folder, self.repo_id, revision, message)
                    return PushResult(self.repo_id, revision, str(folder), ok=False, error=message, attempts=attempts)
                logger.info("Pushed %s to %s@%s: %s", folder, self.repo_id, revision, url)
                return PushResult(self.repo_id, revision, str(folder), ok=True, url=url, attempts=attempts)
        finally:
            shutil.rmtree(staged, ignore_errors=True)

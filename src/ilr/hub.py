"""Hugging Face Hub I/O for evaluation: pull released checkpoints (revision-pinned), push eval cards.

Everything that talks to the Hub goes through here, so that offline mode is checked in one place: with
`HF_HUB_OFFLINE=1` a model that is not in the local cache fails at once with a message naming the flag and the local
path alternative, instead of stalling on the network. Pushes never touch local files: a card is written to disk first
and a failed push leaves it there.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path


__all__ = ["HubUnavailableError", "download_model", "hub_offline", "push_files", "resolve_model"]

logger = logging.getLogger(__name__)

_TRUE = ("1", "ON", "YES", "TRUE")


class HubUnavailableError(ConnectionError):
    """The Hub cannot be reached (offline mode, no network, missing repository). The message names the fix."""


def hub_offline() -> bool:
    """
    Whether offline mode is on: `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) set now or when `huggingface_hub` was
    imported.

    Returns:
        `bool`: `True` when the Hub must not be contacted.
    """
    from huggingface_hub import constants

    from_env = any(
        os.environ.get(name, "").strip().upper() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    return bool(constants.HF_HUB_OFFLINE) or from_env


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

    Returns:
        `tuple[str, str | None]`: The local folder and the commit sha (`None` when only a cached copy was found
        offline and its sha cannot be told).

    Raises:
        `HubUnavailableError`: offline without a cached copy, or the repository/revision cannot be reached.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

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
    try:
        sha = HfApi(token=token).model_info(repo_id, revision=revision).sha
        folder = snapshot_download(repo_id, revision=sha, local_dir=local_dir, allow_patterns=patterns, token=token)
    except RepositoryNotFoundError as error:
        raise HubUnavailableError(
            f"{repo_id} is not a Hub model repository (or it is private: log in with `hf auth login`). For a model "
            "on disk pass its folder path."
        ) from error
    except (HfHubHTTPError, OSError) as error:
        raise HubUnavailableError(
            f"cannot download {repo_id}@{revision or 'main'}: {error}".splitlines()[0]
        ) from error
    logger.info("Downloaded %s@%s to %s", repo_id, sha, folder)
    return folder, sha


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
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise HubUnavailableError(
            f"push to {repo_id} failed ({first_line}); the files stay on disk: "
            f"{', '.join(str(p) for p in files.values())}."
        ) from error
    return info.pr_url or info.commit_url

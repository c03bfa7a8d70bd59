"""IRT estimates of a run: the pre-passes that measure difficulty and ability with the agents' models, and the cache.

The maths (1PL, mode selection, ability inversion, the joint fit, building an [`~ilr.difficulty.IRTEstimate`]) is
pure and lives in [`ilr.difficulty`]; this module is where it meets models and files:

- the pre-passes: [`self_rank_prepass`] (each agent rates questions 1-10), [`pass_rate_prepass`] (k answers per
  question and agent, scored), [`validation_accuracy`], and [`estimate_irt`] that runs the ones a recipe asks for;
- the cache: JSON files under `difficulty_cache_dir`, keyed by agents, data and settings ([`irt_key_fields`],
  [`irt_cache_path`]), written atomically ([`save_irt`], [`load_irt`]).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ilr.data import build_prompt, canonical_row_bytes
from ilr.difficulty import (
    DEFAULT_IRT_SCALE,
    DIFFICULTY_SOURCES,
    SELF_RANK_TEMPLATE,
    IRTEstimate,
    parse_self_rank,
    pass_rate_estimate,
    self_rank_estimate,
)
from ilr.files import write_text_atomic
from ilr.generation import SamplingParams
from ilr.prompts import load_template, render
from ilr.rewards import score_math
from ilr.sampler import RngStream, torch_seed


if TYPE_CHECKING:
    from ilr.configs import AgentConfig, ILRConfig


__all__ = [
    "CACHE_KEY_FIELDS",
    "estimate_irt",
    "irt_cache_key",
    "irt_cache_path",
    "irt_key_fields",
    "load_irt",
    "pass_rate_prepass",
    "run_key_fields",
    "save_irt",
    "self_rank_prepass",
    "validation_accuracy",
]

logger = logging.getLogger(__name__)

# Fields every cache key must have: the same agents (weights) on the same questions, estimated the same way.
CACHE_KEY_FIELDS = ("agents", "dataset", "split", "source", "samples", "scale", "seed", "dataset_fingerprint")


# ---------------------------------------------------------------------------------------------------------------------
# The cache (file I/O)
# ---------------------------------------------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"IRT cache key fields must be JSON-serialisable (got {type(value).__name__}).")


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=_json_default, allow_nan=False)


def irt_key_fields(
    *,
    agents: Sequence[tuple[str, str | None]],
    dataset: str,
    split: str,
    source: str,
    data_files: str | Sequence[str] | None = None,
    samples: int | None = None,
    scale: float = DEFAULT_IRT_SCALE,
    seed: int = 0,
    dataset_fingerprint: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """
    The fields that identify an IRT estimate, in one canonical dictionary (see [`irt_cache_path`]).

    Args:
        agents (`Sequence[tuple[str, str | None]]`):
            Each agent's `(model id or path, revision)`, in agent order.
        dataset (`str`):
            Training dataset name (Hub id or benchmark name).
        split (`str`):
            Training split.
        source (`str`):
            `self_rank` or `pass_rate`.
        data_files (`str` or `Sequence[str]`, *optional*):
            Local data files, when any.
        samples (`int`, *optional*):
            k of `pass_rate` (`None` for `self_rank`).
        scale (`float`, *optional*, defaults to `1.7`):
            Logistic scaling constant.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the pre-pass sampling.
        dataset_fingerprint (`str`, *optional*):
            Hash of the questions actually rated (e.g. of ids and problem texts), so a changed split never reuses.
        **extra:
            Further JSON-serialisable settings that change the estimate (validation set, sampling parameters, system
            prompt).

    Returns:
        `dict[str, Any]`: The key fields, including the SHA-256 of the prompt template the pre-pass uses, so that
        editing the prompt invalidates the cache.
    """
    if source not in DIFFICULTY_SOURCES:
        raise ValueError(f"`source` must be one of {DIFFICULTY_SOURCES} (got {source!r}).")
    template = SELF_RANK_TEMPLATE if source == "self_rank" else "math_single"
    files = [data_files] if isinstance(data_files, str | os.PathLike) else data_files
    return {
        "agents": [{"model": str(model), "revision": revision} for model, revision in agents],
        "dataset": dataset,
        "data_files": [str(path) for path in files] if files is not None else None,
        "split": split,
        "source": source,
        "samples": samples,
        "scale": float(scale),
        "seed": seed,
        "dataset_fingerprint": dataset_fingerprint,
        "prompt_sha256": hashlib.sha256(load_template(template).encode("utf-8")).hexdigest(),
        **extra,
    }


def irt_cache_key(key_fields: dict[str, Any]) -> str:
    """
    SHA-256 of the canonical JSON of the key fields (sorted keys, so the order of fields does not matter).

    Args:
        key_fields (`dict[str, Any]`):
            Must hold every name in `CACHE_KEY_FIELDS`; see [`irt_key_fields`].

    Returns:
        `str`: 64 hex digits.
    """
    missing = [name for name in CACHE_KEY_FIELDS if name not in key_fields]
    if missing:
        raise ValueError(f"IRT cache key fields lack {missing}; build them with `irt_key_fields`.")
    return hashlib.sha256(_canonical_json(key_fields).encode("utf-8")).hexdigest()


def irt_cache_path(cache_dir: str | os.PathLike, key_fields: dict[str, Any]) -> Path:
    """
    Where the estimate for these key fields lives: `<cache_dir>/irt_<source>_<key[:16]>.json`.

    Args:
        cache_dir (`str` or `os.PathLike`):
            Cache folder (`difficulty_cache_dir`).
        key_fields (`dict[str, Any]`):
            See [`irt_key_fields`].

    Returns:
        `Path`: The cache file (it may not exist yet).
    """
    return Path(cache_dir) / f"irt_{key_fields['source']}_{irt_cache_key(key_fields)[:16]}.json"


def save_irt(path: str | os.PathLike, estimate: IRTEstimate, key_fields: dict[str, Any] | None = None) -> Path:
    """
    Write an estimate atomically (temporary file in the same folder, then `os.replace`): a crash mid-write leaves
    either the old file or none, never a truncated one.

    Args:
        path (`str` or `os.PathLike`):
            Target file, usually from [`irt_cache_path`].
        estimate (`IRTEstimate`):
            What to store.
        key_fields (`dict[str, Any]`, *optional*):
            Stored with the estimate (`metadata["cache_key_fields"]` and `["cache_key"]`), so [`load_irt`] can check
            that a file really belongs to its key.

    Returns:
        `Path`: The written file.
    """
    path = Path(path)
    payload = estimate.to_dict()
    if key_fields is not None:
        payload["metadata"] = {
            **payload["metadata"],
            "cache_key_fields": json.loads(_canonical_json(key_fields)),
            "cache_key": irt_cache_key(key_fields),
        }
    return write_text_atomic(path, json.dumps(payload, default=_json_default, allow_nan=False))


def load_irt(path: str | os.PathLike, key_fields: dict[str, Any] | None = None) -> IRTEstimate | None:
    """
    Read a cached estimate, or `None` when there is none usable.

    A missing file gives `None` quietly. A corrupt or malformed file, or one whose stored key fields differ from
    `key_fields` (a file copied under another key's name), gives a warning and `None`: the caller recomputes.

    Args:
        path (`str` or `os.PathLike`):
            Cache file.
        key_fields (`dict[str, Any]`, *optional*):
            Expected key fields; when given, the file must have been saved with exactly these.

    Returns:
        `IRTEstimate | None`
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise TypeError("top level is not an object")
        estimate = IRTEstimate.from_dict(data)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        logger.warning("Ignoring unreadable IRT cache %s (%s: %s); recomputing.", path, type(err).__name__, err)
        return None
    if key_fields is not None:
        stored = estimate.metadata.get("cache_key_fields")
        if stored != json.loads(_canonical_json(key_fields)):
            logger.warning("Ignoring IRT cache %s: it was computed for other agents, data or settings.", path)
            return None
    return estimate


# ---------------------------------------------------------------------------------------------------------------------
# Pre-passes (model calls)
# ---------------------------------------------------------------------------------------------------------------------

Messages = list[dict[str, str]]
# Greedy: a rating is a judgement, not an exploration; 256 tokens leave room for a model that explains first.
DEFAULT_SELF_RANK_PARAMS = SamplingParams(n=1, temperature=0.0, max_new_tokens=256)
DEFAULT_PASS_RATE_PARAMS = SamplingParams(n=1, temperature=1.0, max_new_tokens=1024)


def _agent_name(backend: Any, index: int) -> str:
    return str(getattr(backend, "name", f"agent{index}"))


def self_rank_prepass(
    questions: Sequence[str], backends: Sequence[Any], params: SamplingParams | None = None
) -> np.ndarray:
    """
    Ask every agent to rate every question 1-10: one `generate` call per agent covering all questions.

    Args:
        questions (`Sequence[str]`):
            Problem texts, filled into `prompts/self_rank.txt`.
        backends (`Sequence[GenerationBackend]`):
            One backend per agent, in agent order.
        params (`SamplingParams`, *optional*):
            Sampling settings, `n` must be 1; defaults to greedy with 256 new tokens.

    Returns:
        `np.ndarray` of shape `(Q, m)`: ratings as floats, `nan` where the reply held no rating (counted in the log;
        [`self_rank_difficulty`] fills them with the agent's median).
    """
    params = DEFAULT_SELF_RANK_PARAMS if params is None else params
    if params.n != 1:
        raise ValueError(f"The self-rank pre-pass reads one rating per question: set `n=1` (got {params.n}).")
    prompts = [[{"role": "user", "content": render(SELF_RANK_TEMPLATE, problem=question)}] for question in questions]
    ratings = np.full((len(questions), len(backends)), np.nan)
    for agent, backend in enumerate(backends):
        output = backend.generate(prompts, params)
        if len(output.completions) != len(prompts):
            raise RuntimeError(
                f"Backend {_agent_name(backend, agent)} returned {len(output.completions)} results for {len(prompts)} prompts."
            )
        for row, completions in enumerate(output.completions):
            rating = parse_self_rank(completions[0].text if completions else None)
            if rating is not None:
                ratings[row, agent] = rating
        unparsed = int(np.isnan(ratings[:, agent]).sum())
        logger.info(
            "Self-rank pre-pass, %s: %d questions rated, %d replies unparsable.",
            _agent_name(backend, agent),
            len(prompts) - unparsed,
            unparsed,
        )
    return ratings


def pass_rate_prepass(
    questions: Sequence[str | Messages],
    golds: Sequence[str],
    backends: Sequence[Any],
    k: int,
    score_fn: Callable[[list[str], list[str]], list[float | None]] | None = None,
    params: SamplingParams | None = None,
) -> np.ndarray:
    """
    Sample k answers per question from every agent and count the correct ones: one `generate` call per agent.

    Args:
        questions (`Sequence[str | list[dict]]`):
            Problem texts (wrapped in the single-agent maths prompt, see `ilr.data.build_prompt`) or ready chat
            prompts.
        golds (`Sequence[str]`):
            Gold final answers, one per question.
        backends (`Sequence[GenerationBackend]`):
            One backend per agent, in agent order.
        k (`int`):
            Samples per question and agent.
        score_fn (`Callable`, *optional*):
            `(completions, golds) -> list[float | None]`; defaults to `ilr.rewards.score_math`. A score of 1.0 is
            correct; anything lower is wrong, and so is `None` (unscorable, counted in a warning).
        params (`SamplingParams`, *optional*):
            Sampling settings; `n` is set to `k`. Defaults to temperature 1.0 and 1024 new tokens.

    Returns:
        `np.ndarray` of dtype `int` and shape `(Q, m)`: correct answers out of `k`.
    """
    if k < 1:
        raise ValueError(f"`k` must be >= 1 (got {k}).")
    if len(golds) != len(questions):
        raise ValueError(f"Got {len(golds)} golds for {len(questions)} questions.")
    score_fn = score_math if score_fn is None else score_fn
    params = dataclasses.replace(DEFAULT_PASS_RATE_PARAMS if params is None else params, n=k)
    prompts = [_math_prompt(question) for question in questions]
    repeated_golds = [gold for gold in golds for _ in range(k)]
    correct = np.zeros((len(questions), len(backends)), dtype=int)
    for agent, backend in enumerate(backends):
        output = backend.generate(prompts, params)
        if len(output.completions) != len(prompts) or any(len(c) != k for c in output.completions):
            raise RuntimeError(f"Backend {_agent_name(backend, agent)} did not return {k} completions per prompt.")
        texts = [completion.text for completions in output.completions for completion in completions]
        scores = score_fn(texts, repeated_golds)
        unscored = sum(score is None for score in scores)
        if unscored:
            logger.warning(
                "Pass-rate pre-pass, %s: %d of %d answers could not be scored and count as wrong.",
                _agent_name(backend, agent),
                unscored,
                len(scores),
            )
        is_correct = np.array([score is not None and score >= 1.0 for score in scores]).reshape(len(prompts), k)
        correct[:, agent] = is_correct.sum(axis=1)
        logger.info("Pass-rate pre-pass, %s: accuracy %.3f.", _agent_name(backend, agent), is_correct.mean())
    return correct


def _math_prompt(question: str | Messages) -> Messages:
    if not isinstance(question, str):
        return list(question)
    return build_prompt({"problem": question, "task": "math"})


# ---------------------------------------------------------------------------------------------------------------------
# A run's estimate
# ---------------------------------------------------------------------------------------------------------------------
def run_key_fields(
    args: ILRConfig,
    agents: Sequence[AgentConfig],
    train_rows: list[dict[str, Any]],
    validation_rows: list[dict[str, Any]],
    *,
    dataset_name: str,
    data_files: list[str] | None,
    system_prompt: str | None,
) -> dict[str, Any]:
    """
    The cache key fields of a training run's estimate: agents, data (fingerprinted), source and its settings.

    Args:
        args ([`~ilr.configs.ILRConfig`]):
            The run's settings (`difficulty_source`, `difficulty_samples`, `irt_scale`, `seed`, ...).
        agents (`Sequence[AgentConfig]`):
            The trained agents.
        train_rows (`list[dict]`):
            The training questions.
        validation_rows (`list[dict]`):
            The validation questions that measure ability (`self_rank`).
        dataset_name (`str`):
            Name of the training data.
        data_files (`list[str]`, *optional*):
            Local data files.
        system_prompt (`str`, *optional*):
            System message of the prompts.

    Returns:
        `dict[str, Any]`: From [`irt_key_fields`].
    """

    def fingerprint(rows: list[dict[str, Any]]) -> str:
        return hashlib.sha256(b"".join(canonical_row_bytes(row) for row in rows)).hexdigest()

    validation = validation_rows if args.difficulty_source == "self_rank" else []
    return irt_key_fields(
        agents=[(agent.model_name_or_path, agent.model_revision) for agent in agents],
        dataset=dataset_name,
        split="train",
        source=args.difficulty_source,
        data_files=data_files,
        samples=args.difficulty_samples if args.difficulty_source == "pass_rate" else None,
        scale=args.irt_scale,
        seed=args.seed,
        dataset_fingerprint=fingerprint(train_rows),
        validation_fingerprint=fingerprint(validation),
        max_completion_length=args.max_completion_length,
        temperature=args.temperature,
        system_prompt=system_prompt,
    )


def estimate_irt(
    args: ILRConfig,
    agent_names: Sequence[str],
    train_rows: list[dict[str, Any]],
    validation_rows: list[dict[str, Any]],
    backends: Sequence[Any],
    *,
    system_prompt: str | None = None,
) -> IRTEstimate:
    """
    Run the pre-pass of `difficulty_source` and build the estimate.

    `self_rank`: each agent rates every training question and every validation question (one greedy call per agent
    and set), and answers the validation questions greedily (one call per agent); gamma is the ability matching that
    accuracy on the same scale. `pass_rate`: `difficulty_samples` answers per training question and agent, and a
    joint 1PL fit.

    Args:
        args ([`~ilr.configs.ILRConfig`]):
            The run's settings.
        agent_names (`Sequence[str]`):
            The agents' names (metadata).
        train_rows (`list[dict]`):
            The training questions (canonical rows).
        validation_rows (`list[dict]`):
            The validation questions that measure ability (`self_rank`).
        backends (`Sequence[GenerationBackend]`):
            One backend per agent.
        system_prompt (`str`, *optional*):
            System message of the answer prompts.

    Returns:
        [`~ilr.difficulty.IRTEstimate`]
    """
    ids = [str(row["id"]) for row in train_rows]
    metadata = {"agents": list(agent_names)}
    if args.difficulty_source == "pass_rate":
        params = SamplingParams(
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=args.max_completion_length,
            seed=torch_seed(args.seed, 0, RngStream.PREPASS),
        )
        prompts = [build_prompt(row, system_prompt=system_prompt) for row in train_rows]
        golds = [row["answer"] for row in train_rows]
        correct = pass_rate_prepass(prompts, golds, backends, args.difficulty_samples, params=params)
        return pass_rate_estimate(ids, correct, args.difficulty_samples, scale=args.irt_scale, metadata=metadata)

    train_ratings = self_rank_prepass([row["problem"] for row in train_rows], backends)
    val_ratings = self_rank_prepass([row["problem"] for row in validation_rows], backends)
    val_accuracy = validation_accuracy(
        validation_rows,
        backends,
        agent_names,
        max_new_tokens=args.max_completion_length,
        system_prompt=system_prompt,
    )
    return self_rank_estimate(ids, train_ratings, val_ratings, val_accuracy, scale=args.irt_scale, metadata=metadata)


def validation_accuracy(
    rows: list[dict[str, Any]],
    backends: Sequence[Any],
    agent_names: Sequence[str],
    *,
    max_new_tokens: int,
    system_prompt: str | None = None,
) -> np.ndarray:
    """
    Each agent's greedy accuracy on validation questions: one batched call per agent.

    Args:
        rows (`list[dict]`):
            Validation questions (canonical rows with `answer`).
        backends (`Sequence[GenerationBackend]`):
            One backend per agent.
        agent_names (`Sequence[str]`):
            The agents' names (for the log).
        max_new_tokens (`int`):
            Answer length limit.
        system_prompt (`str`, *optional*):
            System message of the prompts.

    Returns:
        `np.ndarray` of shape `(m,)`.
    """
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens)
    prompts = [build_prompt(row, system_prompt=system_prompt) for row in rows]
    correct = pass_rate_prepass(prompts, [row["answer"] for row in rows], backends, 1, params=params)
    accuracy = correct.mean(axis=0)
    logger.info("Validation accuracy (%d questions): %s", len(rows), dict(zip(agent_names, accuracy)))
    return accuracy

"""Checkpoints of an ILR run: layout, atomic writes, rotation, resuming, RNG state.

A checkpoint is `<output_dir>/checkpoint-<step>/`, written as `tmp-checkpoint-<step>/` and renamed when complete, so
a run killed while saving never leaves a half-written `checkpoint-<step>`. It holds:

    <agent.name>/              per agent (see [`~ilr.runtime.AgentRuntime.save_training_state`]): model or LoRA
                               adapter, tokenizer, `optimizer.pt` (under DeepSpeed instead the engine's own checkpoint
                               in `deepspeed/`, one optimizer partition per process), `scheduler.pt`
    trainer_state.json         step, sampler position, ability window, token count
    rng_state.pth              python, numpy, torch (and CUDA) global RNG states
    irt.json                   the IRT estimate, under `interaction_mode: dynamic`
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import is_peft_model
from safetensors.torch import load_file


__all__ = [
    "CHECKPOINT_PREFIX",
    "DEEPSPEED_CHECKPOINT_TAG",
    "IRT_STATE_NAME",
    "OPTIMIZER_NAME",
    "RNG_STATE_NAME",
    "SCHEDULER_NAME",
    "TMP_CHECKPOINT_PREFIX",
    "TRAINER_STATE_NAME",
    "latest_checkpoint",
    "load_weights",
    "publish",
    "read_trainer_state",
    "remove_unfinished",
    "resolve_checkpoint",
    "restore_rng_state",
    "rotate_checkpoints",
    "save_rng_state",
    "start_checkpoint",
    "write_trainer_state",
]

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TMP_CHECKPOINT_PREFIX = "tmp-checkpoint-"
TRAINER_STATE_NAME = "trainer_state.json"
RNG_STATE_NAME = "rng_state.pth"
IRT_STATE_NAME = "irt.json"
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
# Under DeepSpeed: the tag (sub-folder of `<checkpoint>/<agent.name>/`) of each engine's own checkpoint.
DEEPSPEED_CHECKPOINT_TAG = "deepspeed"
STATE_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------------------------------
# Finding, publishing, rotating
# ---------------------------------------------------------------------------------------------------------------------
def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """
    The complete checkpoint with the highest step in `output_dir` (`checkpoint-<step>` holding a trainer state);
    unfinished `tmp-checkpoint-*` folders are never returned.

    Args:
        output_dir (`str` or `os.PathLike`):
            The run's output folder.

    Returns:
        `Path | None`: The checkpoint folder, or `None` when there is none.
    """
    found = _complete_checkpoints(Path(output_dir))
    return found[-1] if found else None


def _complete_checkpoints(output_dir: Path) -> list[Path]:
    if not output_dir.is_dir():
        return []
    pattern = re.compile(rf"{CHECKPOINT_PREFIX}(\d+)")
    steps = []
    for path in output_dir.iterdir():
        match = pattern.fullmatch(path.name)
        if match and (path / TRAINER_STATE_NAME).is_file():
            steps.append((int(match.group(1)), path))
    return [path for _, path in sorted(steps)]


def _discard(checkpoint: Path) -> None:
    """
    Delete a checkpoint folder without ever leaving a half-deleted `checkpoint-<step>` (one that still has its trainer
    state but lost model files): it is first renamed, atomically, to a `tmp-checkpoint-*` name, which resuming ignores
    and cleans up if the process dies during the deletion.
    """
    doomed = checkpoint.with_name(f"{TMP_CHECKPOINT_PREFIX}{checkpoint.name}-deleting")
    shutil.rmtree(doomed, ignore_errors=True)  # left by an earlier deletion that failed
    os.replace(checkpoint, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def start_checkpoint(tmp: Path) -> None:
    """Create an empty `tmp-checkpoint-<step>` folder (removing what an earlier attempt at the step left)."""
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)


def publish(tmp: Path, final: Path) -> None:
    """Rename a finished `tmp-checkpoint-<step>` to `checkpoint-<step>`, replacing one of the same step (a step saved
    again after a resume)."""
    if final.exists():
        _discard(final)
    os.replace(tmp, final)


def rotate_checkpoints(output_dir: Path, save_total_limit: int | None) -> None:
    """Keep the `save_total_limit` newest complete checkpoints (all of them when it is not set)."""
    if not save_total_limit or save_total_limit < 1:
        return
    checkpoints = _complete_checkpoints(output_dir)
    for stale in checkpoints[: max(0, len(checkpoints) - save_total_limit)]:
        _discard(stale)


def remove_unfinished(output_dir: Path) -> None:
    """Remove `tmp-checkpoint-*` folders: left by a run that stopped while writing (or deleting) a checkpoint."""
    if not output_dir.is_dir():
        return
    for partial in output_dir.glob(f"{TMP_CHECKPOINT_PREFIX}*"):
        logger.warning("Removing the unfinished checkpoint %s (the run stopped while writing it).", partial)
        shutil.rmtree(partial, ignore_errors=True)


def resolve_checkpoint(output_dir: Path, resume_from_checkpoint: str | bool | None) -> Path | None:
    """
    The checkpoint a `resume_from_checkpoint` value names.

    Args:
        output_dir (`Path`):
            The run's output folder.
        resume_from_checkpoint (`str` or `bool`, *optional*):
            `True` (or `"true"`): the latest complete checkpoint in `output_dir`; a path: that checkpoint; `None`,
            `False` or `""`: none.

    Returns:
        `Path | None`
    """
    if resume_from_checkpoint is None or str(resume_from_checkpoint).lower() in ("false", "none", ""):
        return None
    if str(resume_from_checkpoint).lower() == "true":
        checkpoint = latest_checkpoint(output_dir)
        if checkpoint is None:
            raise FileNotFoundError(
                f"`resume_from_checkpoint: true` but {output_dir} holds no complete checkpoint: remove the flag "
                "to start a new run, or point it at a checkpoint folder."
            )
        return checkpoint
    checkpoint = Path(resume_from_checkpoint)
    if not (checkpoint / TRAINER_STATE_NAME).is_file():
        raise FileNotFoundError(f"{checkpoint} is not a complete ILR checkpoint (no {TRAINER_STATE_NAME}).")
    return checkpoint


# ---------------------------------------------------------------------------------------------------------------------
# Trainer state and RNG state
# ---------------------------------------------------------------------------------------------------------------------
def write_trainer_state(folder: Path, state: dict[str, Any]) -> None:
    """Write `trainer_state.json` (the loop's position: step, sampler, ability window, token count)."""
    state = {"format_version": STATE_FORMAT_VERSION, **state}
    (folder / TRAINER_STATE_NAME).write_text(json.dumps(state, indent=2), encoding="utf-8")


def read_trainer_state(checkpoint: Path, agent_names: Sequence[str], num_training_steps: int) -> dict[str, Any]:
    """
    Read `trainer_state.json`, refusing a checkpoint of other agents.

    Args:
        checkpoint (`Path`):
            The checkpoint folder.
        agent_names (`Sequence[str]`):
            This run's agents, in order.
        num_training_steps (`int`):
            This run's length (a different one only changes the learning-rate schedule: a warning).

    Returns:
        `dict[str, Any]`
    """
    state = json.loads((checkpoint / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
    names = list(agent_names)
    if state["agents"] != names:
        raise ValueError(f"{checkpoint} was written for agents {state['agents']}, this run has {names}.")
    if state["num_training_steps"] != num_training_steps:
        logger.warning(
            "The checkpoint's run had %d steps, this one has %d: the learning-rate schedule differs.",
            state["num_training_steps"],
            num_training_steps,
        )
    return state


def save_rng_state(folder: Path) -> None:
    """Save the global RNG states (python, numpy, torch, CUDA) to `rng_state.pth`."""
    rng_state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    torch.save(rng_state, folder / RNG_STATE_NAME)


def restore_rng_state(checkpoint: Path) -> None:
    """Restore the global RNG states saved by [`save_rng_state`]."""
    rng_state = torch.load(checkpoint / RNG_STATE_NAME, weights_only=False)
    random.setstate(rng_state["python"])
    np.random.set_state(rng_state["numpy"])
    torch.set_rng_state(rng_state["torch"])
    if rng_state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng_state["cuda"])


# ---------------------------------------------------------------------------------------------------------------------
# Model weights
# ---------------------------------------------------------------------------------------------------------------------
def drop_tied_copies(model: Any, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep one name per tied parameter (the first, as `save_pretrained` keeps of tensors sharing storage)."""
    first_name: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first_name and first_name[id(param)] in state_dict:
            state_dict.pop(name, None)
        first_name.setdefault(id(param), name)
    return state_dict


def load_weights(model: Any, folder: Path) -> None:
    """Load weights saved by `save_pretrained` (full model, possibly sharded, or a LoRA adapter) into `model`."""
    if is_peft_model(model):
        from peft import set_peft_model_state_dict  # peft is optional: only LoRA agents reach this line

        set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
        return
    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    )
    state_dict: dict[str, torch.Tensor] = {}
    for name in files:
        state_dict.update(load_file(folder / name))
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    # `save_pretrained` writes a tied weight once; the missing name shares its storage with a loaded one.
    loaded = {tensor.data_ptr() for name, tensor in model.state_dict().items() if name in state_dict}
    params = model.state_dict()
    untied_missing = [name for name in missing if params[name].data_ptr() not in loaded]
    if unexpected or untied_missing:
        raise RuntimeError(
            f"Checkpoint {folder} does not match the model: missing {untied_missing}, unexpected {list(unexpected)}."
        )

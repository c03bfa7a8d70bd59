"""Reward curves of a training run: read from the trainer's `metrics.jsonl`, drawn to a PNG next to the checkpoints."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path


__all__ = ["CURVES_NAME", "read_reward_curves", "render_reward_curves", "write_reward_curves"]

logger = logging.getLogger(__name__)

CURVES_NAME = "reward_curves.png"


def read_reward_curves(
    path: str | os.PathLike, agents: Sequence[str]
) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """
    Reward per step of every agent and Idea3 stage, from the trainer's `metrics.jsonl`.

    Args:
        path (`str` or `os.PathLike`):
            The `metrics.jsonl` of the run.
        agents (`Sequence[str]`):
            Agent names, as in the metric keys `ilr/<agent>/<stage>/reward`.

    Returns:
        `dict[str, dict[str, list[tuple[int, float]]]]`: agent -> stage -> `(step, reward)` in step order; steps where
        the reward is missing (NaN, logged as `null`) are left out.
    """
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {agent: {} for agent in agents}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        for agent in agents:
            prefix = f"ilr/{agent}/"
            for key, value in record.items():
                stage, _, leaf = key.removeprefix(prefix).partition("/")
                if key.startswith(prefix) and leaf == "reward" and value is not None:
                    curves[agent].setdefault(stage, []).append((int(record["step"]), float(value)))
    for stages in curves.values():
        for points in stages.values():
            points.sort()
    return curves


def render_reward_curves(
    curves: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]],
    path: str | os.PathLike,
    *,
    trained_stages: Sequence[str] = ("share", "fuse"),
    title: str = "ILR reward per step",
) -> Path:
    """
    Plot the reward curves, one panel per agent and one line per Idea3 stage (trained stages solid, others dashed).

    Drawn on matplotlib's Agg canvas, so it needs no display and leaves pyplot's global state alone.

    Args:
        curves (`Mapping`):
            From [`read_reward_curves`].
        path (`str` or `os.PathLike`):
            PNG file to write.
        trained_stages (`Sequence[str]`, *optional*, defaults to `("share", "fuse")`):
            The stages that got a GRPO loss (`train_stages`).
        title (`str`, *optional*, defaults to `"ILR reward per step"`):
            Figure title.

    Returns:
        `pathlib.Path`: The written file.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    agents = list(curves)
    figure = Figure(figsize=(4.2 * max(1, len(agents)), 3.4), dpi=120)
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, max(1, len(agents)), sharey=True, squeeze=False)[0]
    for axes, agent in zip(panels, agents):
        for stage, points in curves[agent].items():
            if not points:
                continue
            steps, values = zip(*points)
            trained = stage in trained_stages
            axes.plot(
                steps,
                values,
                marker="o",
                markersize=3,
                linestyle="-" if trained else "--",
                linewidth=1.6 if trained else 1.0,
                label=f"{stage}{' (trained)' if trained else ''}",
            )
        axes.set_title(agent, fontsize=9)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    panels[0].set_ylabel("mean reward")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def write_reward_curves(
    output_dir: str | os.PathLike,
    agents: Sequence[str],
    *,
    trained_stages: Sequence[str] = ("share", "fuse"),
    title: str = "ILR reward per step",
    metrics_name: str = "metrics.jsonl",
) -> Path | None:
    """
    Draw `<output_dir>/reward_curves.png` from `<output_dir>/metrics.jsonl`, when both matplotlib and the metrics are
    there (matplotlib comes with the `demo` extra; without it the curve stays in `metrics.jsonl`).

    Args:
        output_dir (`str` or `os.PathLike`):
            The run's folder.
        agents (`Sequence[str]`):
            Agent names.
        trained_stages (`Sequence[str]`, *optional*, defaults to `("share", "fuse")`):
            The recipe's `train_stages`.
        title (`str`, *optional*, defaults to `"ILR reward per step"`):
            Figure title.
        metrics_name (`str`, *optional*, defaults to `"metrics.jsonl"`):
            The metrics file in `output_dir`.

    Returns:
        `pathlib.Path` or `None`: The PNG, or `None` when it could not be drawn.
    """
    import importlib.util

    metrics = Path(output_dir) / metrics_name
    if not metrics.is_file():
        return None
    if importlib.util.find_spec("matplotlib") is None:
        logger.info("matplotlib is not installed (`pip install ilr[demo]`): the reward curve is in %s only.", metrics)
        return None
    curves = read_reward_curves(metrics, agents)
    return render_reward_curves(curves, Path(output_dir) / CURVES_NAME, trained_stages=trained_stages, title=title)

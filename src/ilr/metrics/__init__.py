"""Local `evaluate` metric modules shipped inside the package, loaded by path so they work offline.

Each metric is a folder holding a script of the same name (`math_accuracy/math_accuracy.py`), the layout
`evaluate.load(path)` expects. The scripts only wrap `ilr.rewards.score_math` and `ilr.stats.pass_at_k`, so the
library API and these modules can never disagree. `evaluate.load("<name>")` with a bare name would fetch a script
from the Hub instead: always go through [`load_metric`].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


__all__ = ["METRICS", "load_metric", "metric_path"]

_METRICS_DIR = Path(__file__).resolve().parent
METRICS: tuple[str, ...] = ("math_accuracy", "pass_at_k")


def metric_path(name: str) -> Path:
    """
    Folder of a packaged metric, for `evaluate.load(str(path))`.

    Args:
        name (`str`):
            One of `METRICS`.

    Returns:
        `pathlib.Path`: The metric's folder (it holds `<name>.py`).
    """
    if name not in METRICS:
        raise ValueError(f"Unknown ilr metric {name!r}; packaged metrics: {', '.join(METRICS)}.")
    return _METRICS_DIR / name


def load_metric(name: str, **kwargs: Any):
    """
    Load a packaged metric with `evaluate.load`, from its local path (never from the Hub).

    Args:
        name (`str`):
            One of `METRICS`: `"math_accuracy"` or `"pass_at_k"`.
        **kwargs:
            Passed to `evaluate.load` (e.g. `experiment_id`).

    Returns:
        `evaluate.EvaluationModule`: The metric.
    """
    import evaluate

    return evaluate.load(str(metric_path(name)), **kwargs)

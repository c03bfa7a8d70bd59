"""A model's evaluations before and after training, compared question by question: paired bootstrap differences and a
Markdown table (`make demo`'s table)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ilr.stats import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, bootstrap_interval, paired_bootstrap


__all__ = [
    "METRICS",
    "Comparison",
    "build_table",
    "compare_outcomes",
    "format_table",
    "is_compliant",
    "outcomes_from_details",
]

# Metric key -> label in the table. Accuracy: math-verify finds the answer equal to the gold (`ilr evaluate`'s scoring).
# Format: the last `\boxed{}` holds a plain number (after its last `=`), right or wrong: the answer-format compliance.
METRICS: dict[str, str] = {"accuracy": "accuracy", "format": "format (numeric \\boxed{})"}


def is_compliant(extracted: str | None) -> bool:
    r"""
    Whether a final answer follows the answer format: a non-empty `\boxed{}` whose content is a plain number.

    The content is read after its last `=` or `\approx` and must be an integer, decimal or integer fraction (units and
    `\$` allowed), the rule the training reward ([`~ilr.rewards.score_math`], `training` preset) applies to numeric
    golds: `\boxed{17+21}` and `\boxed{}` are not compliant, `\boxed{38}` and `\boxed{17+21=38}` are. Accuracy uses
    math-verify's own verdicts (the `evaluation` preset), so a correct answer stated without a box is not compliant.

    Args:
        extracted (`str` or `None`):
            The content of the last `\boxed{}` (`ilr.rewards.extract_boxed`), `None` when there is none.

    Returns:
        `bool`: Whether the answer is a numeric box.
    """
    from ilr.rewards import is_numeric_answer

    return is_numeric_answer(extracted)


def outcomes_from_details(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """
    Per-question outcomes of one model from its evaluation details (one sample per question).

    Args:
        records (`Sequence[Mapping]`):
            Its details records (`ilr.evaluate.read_details` values), each with `id`, `correct` and `extracted`.

    Returns:
        `dict[str, dict[str, float]]`: metric (`accuracy`, `format`) -> question id -> 1.0 or 0.0.
    """
    outcomes: dict[str, dict[str, float]] = {metric: {} for metric in METRICS}
    for record in records:
        if len(record["correct"]) != 1:
            raise ValueError(
                f"Question {record['id']!r} has {len(record['correct'])} samples: the demo evaluates one greedy "
                "answer per question."
            )
        outcomes["accuracy"][record["id"]] = float(bool(record["correct"][0]))
        outcomes["format"][record["id"]] = float(is_compliant(record["extracted"][0]))
    return outcomes


@dataclass(frozen=True)
class Comparison:
    """
    One metric of one agent before and after training.

    Args:
        before (`dict`):
            Mean over the questions before training with its bootstrap interval (`Interval.to_dict()`).
        after (`dict`):
            The same after training.
        difference (`dict`):
            Paired difference after - before on the common questions (`PairedComparison.to_dict()`).
        n (`int`):
            Number of questions compared.
    """

    before: dict[str, Any]
    after: dict[str, Any]
    difference: dict[str, Any]
    n: int

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval of the difference lies strictly on one side of zero."""
        interval = self.difference["difference"]
        return interval["low"] > 0 or interval["high"] < 0

    @property
    def gain(self) -> bool:
        """Whether the interval of the difference lies strictly above zero: training helped."""
        return self.difference["difference"]["low"] > 0

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {
            "before": self.before,
            "after": self.after,
            "difference": self.difference,
            "n": self.n,
            "excludes_zero": self.excludes_zero,
            "gain": self.gain,
        }


def compare_outcomes(
    before: Mapping[str, float],
    after: Mapping[str, float],
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Comparison:
    """
    Compare per-question outcomes before and after training, on the questions both runs answered.

    Args:
        before (`Mapping[str, float]`):
            Question id -> outcome (0/1) before training.
        after (`Mapping[str, float]`):
            Question id -> outcome after training.
        confidence (`float`, *optional*, defaults to `0.95`):
            Coverage of the intervals.
        n_resamples (`int`, *optional*, defaults to `10000`):
            Bootstrap draws.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the draws.

    Returns:
        [`Comparison`]: Both means with their intervals and the paired difference after - before.
    """
    stats_kwargs = {"confidence": confidence, "n_resamples": n_resamples, "seed": seed}
    paired = paired_bootstrap(after, before, **stats_kwargs)
    common = [question for question in after if question in before]
    return Comparison(
        before=bootstrap_interval([before[q] for q in common], **stats_kwargs).to_dict(),
        after=bootstrap_interval([after[q] for q in common], **stats_kwargs).to_dict(),
        difference=paired.to_dict(),
        n=paired.n_common,
    )


def build_table(
    before: Mapping[str, Mapping[str, Mapping[str, float]]],
    after: Mapping[str, Mapping[str, Mapping[str, float]]],
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict[str, dict[str, Comparison]]:
    """
    The before/after comparison of every agent and metric.

    Args:
        before (`Mapping`):
            Agent -> metric -> question id -> outcome before training (see [`outcomes_from_details`]).
        after (`Mapping`):
            The same after training; its agents and metrics set the table's rows.
        confidence (`float`, *optional*, defaults to `0.95`):
            Coverage of the intervals.
        n_resamples (`int`, *optional*, defaults to `10000`):
            Bootstrap draws.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the draws (the same for every row, so rows with the same data get the same interval).

    Returns:
        `dict[str, dict[str, Comparison]]`: agent -> metric -> [`Comparison`].
    """
    missing = [agent for agent in after if agent not in before]
    if missing:
        raise ValueError(f"No evaluation before training for agent(s) {missing}: every row needs both.")
    return {
        agent: {
            metric: compare_outcomes(
                before[agent][metric], outcomes, confidence=confidence, n_resamples=n_resamples, seed=seed
            )
            for metric, outcomes in metrics.items()
        }
        for agent, metrics in after.items()
    }


def _pct(interval: Mapping[str, Any], *, signed: bool = False) -> str:
    estimate = f"{100 * interval['estimate']:+.1f}" if signed else f"{100 * interval['estimate']:.1f}"
    return f"{estimate} [{100 * interval['low']:.1f}, {100 * interval['high']:.1f}]"


def format_table(table: Mapping[str, Mapping[str, Comparison]], *, confidence: float = DEFAULT_CONFIDENCE) -> str:
    """
    The before/after table in Markdown: one row per agent and metric, percentages with their intervals.

    Args:
        table (`Mapping[str, Mapping[str, Comparison]]`):
            From [`build_table`].
        confidence (`float`, *optional*, defaults to `0.95`):
            Coverage of the intervals, for the header.

    Returns:
        `str`: The table; the last column says whether the interval of the difference excludes zero.
    """
    level = f"{100 * confidence:g}%"
    header = [
        "Agent",
        "Metric",
        f"Before (%) [{level} CI]",
        f"After (%) [{level} CI]",
        f"After - before (pp) [{level} CI, paired]",
        "Excludes 0",
        "n",
    ]
    lines = ["| " + " | ".join(header) + " |", "|---|---|---:|---:|---:|:---:|---:|"]
    for agent, metrics in table.items():
        for metric, comparison in metrics.items():
            row = [
                agent,
                METRICS.get(metric, metric),
                _pct(comparison.before),
                _pct(comparison.after),
                _pct(comparison.difference["difference"], signed=True),
                "yes" if comparison.excludes_zero else "no",
                str(comparison.n),
            ]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)

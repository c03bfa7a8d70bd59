"""The shape of a results file (`ilr evaluate`), checked by `ilr.evaluate.load_results` for every command that reads one.

Only what readers use is checked (`ilr compare`, `ilr card`, a `--baseline`); keys added later are allowed. A file of
the wrong shape then fails with the first field that is wrong, instead of a `KeyError` deep inside a table.
"""

from __future__ import annotations

from typing import Any


SCHEMA_VERSION = 1

# A spec is a type (`int`, `float` = any number, `str`, `bool`), `None` (null), a tuple of specs (any of them), a
# one-item list (a list of that spec), a dict of required keys, or `Mapping(spec)` (any keys, each value of spec).


class Mapping:
    """Spec of an object whose keys are names chosen by the writer (benchmarks, metrics), each value of `spec`."""

    def __init__(self, spec: Any):
        self.spec = spec


INTERVAL = {"estimate": float, "low": float, "high": float}
BENCHMARK = {
    "data": {"n_problems": int},
    "metrics": {"accuracy": INTERVAL, **{"*": Mapping(INTERVAL)}},
    "per_problem": {"ids": [(str, int)], "num_correct": [int], "num_samples": [int]},
    "tokens": {"prompt": int, "generated": int, "mean_completion": float},
    "timing": {"generation_s": float, "scoring_s": float},
}
RESULTS = {
    "schema_version": int,
    "model": {"name": str, "name_or_path": str, "revision": (str, None)},
    "agents": [str],
    "protocol": {"name": str},
    "sampling": {"num_samples": int, "k": ([int], None), "temperature": (float, None), "top_p": (float, None)},
    "seed": int,
    "confidence": {"level": float, "n_resamples": int, "method": str},
    "benchmarks": Mapping(BENCHMARK),
    "average": (None, {"accuracy": INTERVAL}),
}


def _describe(spec: Any) -> str:
    if isinstance(spec, tuple):
        return " or ".join(_describe(option) for option in spec)
    if isinstance(spec, list):
        return f"a list of {_describe(spec[0])}"
    if isinstance(spec, (dict, Mapping)):
        return "an object"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", None: "null"}[spec]


def _matches(value: Any, spec: Any) -> bool:
    """Whether `value` has the outer type of `spec` (its contents are checked separately)."""
    if isinstance(spec, tuple):
        return any(_matches(value, option) for option in spec)
    if spec is None:
        return value is None
    if isinstance(spec, list):
        return isinstance(value, list)
    if isinstance(spec, (dict, Mapping)):
        return isinstance(value, dict)
    if spec is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if spec is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, spec)


def _problem(value: Any, spec: Any, where: str) -> str | None:
    if not _matches(value, spec):
        shown = repr(value) if len(repr(value)) <= 40 else type(value).__name__
        return f"`{where}` must be {_describe(spec)} (got {shown})"
    if isinstance(spec, tuple):
        spec = next(option for option in spec if _matches(value, option))
    if isinstance(spec, list):
        for index, item in enumerate(value):
            if problem := _problem(item, spec[0], f"{where}[{index}]"):
                return problem
    elif isinstance(spec, Mapping):
        for key, item in value.items():
            if problem := _problem(item, spec.spec, f"{where}.{key}"):
                return problem
    elif isinstance(spec, dict):
        for key, item_spec in spec.items():
            if key == "*":  # the keys not named in the spec
                named = set(spec) - {"*"}
                extra = {name: item for name, item in value.items() if name not in named}
                if problem := _problem(extra, item_spec, where):
                    return problem
            elif key not in value:
                return f"`{where}.{key}` is missing" if where else f"`{key}` is missing"
            elif problem := _problem(value[key], item_spec, f"{where}.{key}" if where else key):
                return problem
    return None


def results_schema_problem(results: Any) -> str | None:
    """
    The first way a loaded results file differs from the schema this ilr reads, or `None` when it matches.

    Args:
        results (`Any`):
            The parsed JSON of a results file.

    Returns:
        `str | None`: e.g. "`benchmarks.gsm8k.metrics` must be an object (got 3)", naming the field.
    """
    if not isinstance(results, dict):
        return f"the file must hold a JSON object (got {type(results).__name__})"
    version = results.get("schema_version")
    if _matches(version, int) and not 1 <= version <= SCHEMA_VERSION:
        return f"`schema_version` must be between 1 and {SCHEMA_VERSION} (got {version})"
    return _problem(results, RESULTS, "")

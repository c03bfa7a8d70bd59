"""Benchmarks and training data for ILR.

Every loader returns rows in one canonical schema (see `CANONICAL_FEATURES`):

- `id` (`str`): the benchmark's own id (the row index when it has none), prefixed with `<source>/` inside composite
  benchmarks such as `aime`.
- `problem` (`str`): the text shown to the model. MBPP: the task text plus its first test, so the function name is
  known. HumanEval: the prompt (signature and docstring).
- `answer` (`str`): the gold final answer for maths, `""` for code.
- `tests` (`list[str]`): standalone test snippets for code (each runs after the solution and `setup`), `[]` for maths.
- `setup` (`str`): code to run before the tests (MBPP's `test_setup_code` / `test_imports`), often `""`.
- `entry_point` (`str`): the function under test for code, `""` for maths.
- `task` (`str`): `"math"` or `"code"`.
- `source` (`str`): the benchmark name.

Rows that cannot be trained or scored on are dropped and counted in the log, never kept with an empty or unreadable
gold: no extractable answer or no tests, an empty question, a question longer than `max_question_chars`, or a maths
gold that math-verify cannot parse (every completion of it would score `None`). Lines of a local `.jsonl` file that
are blank, not UTF-8 or not a JSON object are skipped and counted the same way. When nothing usable is left,
[`DataError`] names the data and the fix. Each benchmark's Hub id, config, split and raw columns live only in
`BENCHMARKS`; local files passed as `data_files` must use that same raw schema.
"""

import ast
import builtins
import contextlib
import dataclasses
import glob
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, DatasetDict, Features, IterableDataset, List, Value
from datasets.exceptions import DatasetNotFoundError

from ilr.benchmarks import ANSWER_FORMATS, BENCHMARKS, AnswerFormat, BenchmarkSpec
from ilr.offline import hub_offline
from ilr.prompts import render
from ilr.rewards import check_golds, extract_boxed


__all__ = [
    "BENCHMARKS",
    "CANONICAL_COLUMNS",
    "CANONICAL_FEATURES",
    "DEFAULT_MAX_QUESTION_CHARS",
    "BenchmarkSpec",
    "DataError",
    "add_prompt_column",
    "build_prompt",
    "extract_gold",
    "extract_gsm8k_answer",
    "get_spec",
    "load_benchmark",
    "load_custom_dataset",
    "load_math_split",
    "local_benchmark",
    "make_math_split",
    "normalize_example",
    "normalize_problem_text",
    "split_humaneval_tests",
]

logger = logging.getLogger(__name__)


CANONICAL_FEATURES = Features(
    {
        "id": Value("string"),
        "problem": Value("string"),
        "answer": Value("string"),
        "tests": List(Value("string")),
        "setup": Value("string"),
        "entry_point": Value("string"),
        "task": Value("string"),
        "source": Value("string"),
    }
)
CANONICAL_COLUMNS: tuple[str, ...] = tuple(CANONICAL_FEATURES)

_TEMPLATES = {"math": "math_single", "code": "code_single"}

# Longest question kept, in characters. The longest problem of the registered benchmarks is a few thousand characters;
# a question far beyond that is a broken row (a whole document pasted in), and would crowd out the completion.
DEFAULT_MAX_QUESTION_CHARS = 20_000


class DataError(ValueError):
    """The data has no usable row (or lacks a column). The message names the data and how to fix it."""


def get_spec(name_or_spec: str | BenchmarkSpec) -> BenchmarkSpec:
    """
    Look a benchmark up in the registry.

    Args:
        name_or_spec (`str` or `BenchmarkSpec`):
            Registry name, or a spec (returned unchanged).

    Returns:
        `BenchmarkSpec`: The spec.
    """
    if isinstance(name_or_spec, BenchmarkSpec):
        return name_or_spec
    try:
        return BENCHMARKS[name_or_spec]
    except KeyError:
        raise KeyError(
            f"Unknown benchmark {name_or_spec!r}. Registered: {', '.join(BENCHMARKS)}. "
            "For other datasets use `load_custom_dataset`."
        ) from None


# ---------------------------------------------------------------------------------------------------------------------
# Gold extraction


def extract_gsm8k_answer(text: str | None) -> str | None:
    """
    GSM8K gold: the text after the last `####`, with thousands separators removed.

    Args:
        text (`str` or `None`):
            A GSM8K `answer` field.

    Returns:
        `str` or `None`: E.g. `"1200"` for `"... #### 1,200"`, or `None` without a `####` marker.
    """
    if not text or "####" not in text:
        return None
    answer = text.rsplit("####", 1)[1].strip().replace(",", "")
    return answer or None


def _strip_dollars(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == "$" and "$" not in text[1:-1]:
        return text[1:-1].strip()
    return text


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(t for t in (_as_text(v) for v in value) if t)
    return str(value).strip()


def extract_gold(value: Any, answer_format: AnswerFormat) -> str | None:
    """
    Read a gold answer from a raw field.

    Args:
        value (`Any`):
            The raw field: a string, a number or a list of strings.
        answer_format (`str`):
            `"plain"`, `"boxed"`, `"gsm8k"` or `"list"`; see [`BenchmarkSpec`].

    Returns:
        `str` or `None`: The gold answer, or `None` when it is missing or cannot be extracted.
    """
    if answer_format == "plain":
        gold = _as_text(value)
    elif answer_format == "list":
        items = value if isinstance(value, (list, tuple)) else [value]
        gold = ", ".join(t for t in (_strip_dollars(_as_text(v)) for v in items) if t)
    elif answer_format == "boxed":
        gold = extract_boxed(value if isinstance(value, str) else _as_text(value))
    elif answer_format == "gsm8k":
        gold = extract_gsm8k_answer(value if isinstance(value, str) else _as_text(value))
    else:
        raise ValueError(f"Unknown answer format {answer_format!r}; expected one of {ANSWER_FORMATS}.")
    return gold or None


# ---------------------------------------------------------------------------------------------------------------------
# Code tests


def _is_inert(node: ast.stmt) -> bool:
    """Module-level statements of HumanEval tests that no assert depends on: METADATA and docstrings."""
    if isinstance(node, ast.Assign):
        return all(isinstance(t, ast.Name) and t.id == "METADATA" for t in node.targets)
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)


def split_humaneval_tests(test: str, entry_point: str) -> list[str]:
    """
    Split a HumanEval `check(candidate)` program into standalone assert snippets.

    Each snippet binds the check's parameter to the entry point, e.g. `candidate = add\\nassert candidate(1, 2) == 3`.
    Module-level imports are repeated in every snippet; `METADATA` is dropped, and so are trivial `assert True` lines.
    When the program cannot be split safely (the check body holds anything but asserts, or the module defines helpers
    the asserts may need), the whole program followed by `check(<entry_point>)` is returned as a single test.

    Args:
        test (`str`):
            HumanEval's `test` field.
        entry_point (`str`):
            Name of the function under test.

    Returns:
        `list[str]`: The test snippets (at least one).
    """
    whole = [f"{test.rstrip()}\n\n\ncheck({entry_point})\n"]
    try:
        tree = ast.parse(test)
    except SyntaxError:
        return whole
    checks = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check"]
    if len(checks) != 1 or len(checks[0].args.args) != 1:
        return whole
    check = checks[0]
    imports = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imports.append(ast.get_source_segment(test, node))
        elif node is not check and not _is_inert(node):
            return whole
    if None in imports:
        return whole
    preamble = "".join(f"{line}\n" for line in imports)
    param = check.args.args[0].arg
    snippets = []
    for stmt in check.body:
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue
        if not isinstance(stmt, ast.Assert):
            return whole
        if isinstance(stmt.test, ast.Constant) and stmt.test.value is True:
            continue
        source = ast.get_source_segment(test, stmt)
        if source is None:
            return whole
        snippets.append(f"{preamble}{param} = {entry_point}\n{source}\n")
    return snippets or whole


_BUILTINS = frozenset(dir(builtins))


def _infer_entry_point(tests: list[str], code: str | None) -> str:
    """The first non-builtin function called in the tests, preferring names the reference code defines."""
    called: list[str] = []
    for snippet in tests:
        try:
            tree = ast.parse(snippet)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            is_call = isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            if is_call and node.func.id not in _BUILTINS and node.func.id not in called:
                called.append(node.func.id)
    defined: set[str] = set()
    if code:
        with contextlib.suppress(SyntaxError):
            defined = {n.name for n in ast.parse(code).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    for name in called:
        if name in defined:
            return name
    return called[0] if called else ""


# ---------------------------------------------------------------------------------------------------------------------
# Normalisation


def normalize_example(example: dict[str, Any], index: int, spec: BenchmarkSpec) -> dict[str, Any]:
    """
    Map one raw row onto the canonical schema.

    The gold may come out empty (`answer == ""` for maths, `tests == []` for code); `load_benchmark` drops such rows.

    Args:
        example (`dict`):
            A raw row in the benchmark's own schema.
        index (`int`):
            Row index, used as the id when the spec has no id column.
        spec (`BenchmarkSpec`):
            The benchmark.

    Returns:
        `dict`: A row with exactly the columns of `CANONICAL_FEATURES`.
    """
    raw_id = example.get(spec.id_column) if spec.id_column else None
    row = {
        "id": str(raw_id) if raw_id is not None and str(raw_id) != "" else str(index),
        "problem": _as_text(example[spec.question_column]) if spec.task == "math" else example[spec.question_column],
        "answer": "",
        "tests": [],
        "setup": "",
        "entry_point": "",
        "task": spec.task,
        "source": spec.name,
    }
    if spec.task == "math":
        gold = extract_gold(example.get(spec.answer_column), spec.answer_format)
        if gold is None and spec.fallback_answer_column:
            gold = extract_gold(example.get(spec.fallback_answer_column), spec.fallback_answer_format)
        row["answer"] = gold or ""
        return row

    raw_tests = example.get(spec.tests_column)
    setup = example.get(spec.setup_column) if spec.setup_column else None
    row["setup"] = "\n".join(setup) if isinstance(setup, (list, tuple)) else (setup or "")
    entry_point = _as_text(example.get(spec.entry_point_column)) if spec.entry_point_column else ""
    if spec.tests_format == "humaneval":
        tests = split_humaneval_tests(raw_tests, entry_point) if raw_tests and entry_point else []
    else:
        tests = [t for t in (raw_tests or []) if t and t.strip()]
        if not entry_point:
            entry_point = _infer_entry_point(tests, example.get(spec.code_column) if spec.code_column else None)
        if tests:
            # The first test shows the expected function name and signature, as in the MBPP paper's prompt.
            row["problem"] = f"{row['problem'].strip()}\nYour code should pass this test:\n{tests[0]}"
    row["tests"] = tests
    row["entry_point"] = entry_point
    return row


def _has_gold(row: dict[str, Any]) -> bool:
    return bool(row["answer"]) if row["task"] == "math" else bool(row["tests"])


_NO_GOLD = "without a usable gold"
_EMPTY_QUESTION = "with an empty question"
_UNPARSABLE_GOLD = "whose gold math-verify cannot parse"


def _drop_reason(row: dict[str, Any], max_question_chars: int | None) -> str | None:
    """Why a canonical row cannot be used, or `None`. A maths gold's parse is checked apart, in batches."""
    if not _has_gold(row):
        return _NO_GOLD
    problem = row["problem"]
    if not problem or not problem.strip():
        return _EMPTY_QUESTION
    if max_question_chars is not None and len(problem) > max_question_chars:
        return f"with a question over `max_question_chars` ({max_question_chars} characters; raise it to keep them)"
    return None


def _describe_drops(reasons: Iterable[str | None], example_bad_gold: str | None = None) -> str:
    counts = Counter(reason for reason in reasons if reason)
    parts = []
    for reason, count in counts.items():
        example = f", e.g. {example_bad_gold[:80]!r}" if reason == _UNPARSABLE_GOLD and example_bad_gold else ""
        parts.append(f"{count} {reason}{example}")
    return ", ".join(parts)


def _gold_unparsable(row: dict[str, Any], verify_golds: bool) -> bool:
    # `None` (the check timed out) keeps the row: the gold is not shown to be bad, and scoring bounds it again.
    return verify_golds and row["task"] == "math" and check_golds([row["answer"]])[0] is False


class _DropLogger:
    """Filter predicate for streamed datasets, which cannot be counted up front: logs each dropped row as it goes."""

    def __init__(self, name: str, max_question_chars: int | None = None, verify_golds: bool = False):
        self.name = name
        self.max_question_chars = max_question_chars
        self.verify_golds = verify_golds
        self.dropped = 0

    def __call__(self, row: dict[str, Any]) -> bool:
        reason = _drop_reason(row, self.max_question_chars)
        if reason is None and _gold_unparsable(row, self.verify_golds):
            reason = f"{_UNPARSABLE_GOLD} ({row['answer'][:80]!r})"
        if reason is None:
            return True
        self.dropped += 1
        logger.warning("%s: dropped row %s %s (%d so far).", self.name, row["id"], reason, self.dropped)
        return False


def _schema_fix(spec: BenchmarkSpec) -> str:
    """How to fix data that yields no usable row: the columns and gold format the spec reads."""
    if spec.task == "code":
        gold = f"tests in `{spec.tests_column}`"
    else:
        gold = f"the gold in `{spec.answer_column}` written as `{spec.answer_format}`"
    return (
        f"Check that the data uses {spec.name}'s raw schema (the question in `{spec.question_column}`, {gold}); for "
        "another dataset set `question_column`, `answer_column` and `answer_format`."
    )


# ---------------------------------------------------------------------------------------------------------------------
# Loading

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _as_file_list(data_files: str | os.PathLike | list) -> list[str]:
    files = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
    if not files:
        raise ValueError("`data_files` is empty.")
    return [os.fspath(f) for f in files]


def _builder_for(files: list[str]) -> str:
    builders = set()
    for f in files:
        suffixes = [s for s in Path(f).suffixes if s != ".gz"]
        builder = _BUILDERS.get(suffixes[-1].lower() if suffixes else "")
        if builder is None:
            raise ValueError(f"Cannot tell the format of {f!r}; use one of {', '.join(_BUILDERS)}.")
        builders.add(builder)
    if len(builders) > 1:
        raise ValueError(f"`data_files` mixes formats ({', '.join(sorted(builders))}); pass files of one format.")
    return builders.pop()


def _parse_jsonl_line(line: bytes) -> dict[str, Any] | str:
    """One line of a `.jsonl` file: its JSON object, or why it cannot be used (`blank`, `not UTF-8`, ...)."""
    if not line.strip():
        return "blank"
    try:
        row = json.loads(line.decode("utf-8").lstrip("\ufeff"))
    except UnicodeDecodeError:
        return "not UTF-8"
    except json.JSONDecodeError:
        return "not valid JSON"
    return row if isinstance(row, dict) else "not a JSON object"


def _read_jsonl(path: str) -> Iterator[dict[str, Any]]:
    """
    The JSON objects of a `.jsonl` file, decoded line by line: a bad line (not UTF-8, not JSON, not an object) is
    skipped and counted instead of failing the whole file, and so is a blank line.
    """
    skipped: Counter[str] = Counter()
    lines = 0
    with open(path, "rb") as file:
        for lines, line in enumerate(file, 1):  # noqa: B007 - the last value is the line count
            row = _parse_jsonl_line(line)
            if isinstance(row, str):
                skipped[row] += 1
                continue
            yield row
    if skipped:
        # Blank lines alone are harmless (a trailing empty line); anything else is data the user expected to use.
        level = logging.INFO if set(skipped) == {"blank"} else logging.WARNING
        detail = ", ".join(f"{count} {reason}" for reason, count in skipped.items())
        logger.log(level, "%s: skipped %d of %d lines (%s).", path, skipped.total(), lines, detail)


def unreadable_jsonl_lines(data_files: str | os.PathLike | list | dict | None) -> dict[str, tuple[Counter[str], int]]:
    """
    The lines of local `.jsonl` files that `load_benchmark` would skip as unreadable (blank lines are not counted).

    Args:
        data_files (`str`, `list` or `dict`, *optional*):
            As for [`load_benchmark`]; a composite benchmark's dict of component files is searched too. Other formats
            and glob patterns are read by `datasets`, which fails on a bad line instead of skipping it.

    Returns:
        `dict[str, tuple[Counter[str], int]]`: file -> (unreadable lines by reason, lines in the file), for each file
        with at least one such line.
    """
    if data_files is None:
        return {}
    if isinstance(data_files, dict):
        return {path: found for files in data_files.values() for path, found in unreadable_jsonl_lines(files).items()}
    found = {}
    for path in _as_file_list(data_files):
        if not path.lower().endswith(".jsonl") or glob.has_magic(path) or not os.path.exists(path):
            continue
        with open(path, "rb") as file:
            reasons = [_parse_jsonl_line(line) for line in file]
        bad = Counter(reason for reason in reasons if isinstance(reason, str) and reason != "blank")
        if bad:
            found[path] = (bad, len(reasons))
    return found


def _iter_jsonl(files: list[str]) -> Iterator[dict[str, Any]]:
    for path in files:
        yield from _read_jsonl(path)


def _rows_to_dataset(rows: list[dict[str, Any]], origin: str) -> Dataset:
    """A `Dataset` from JSON objects, with the union of their keys as columns (a key missing from a row is null)."""
    keys = list(dict.fromkeys(key for row in rows for key in row))
    columns = {key: [row.get(key) for row in rows] for key in keys}
    for key, values in columns.items():
        kinds = {type(v) for v in values if v is not None}
        if str in kinds and kinds <= {str, int, float, bool}:
            # `42` in one row and `"\\frac{1}{2}"` in another: both are golds, read as text.
            columns[key] = [v if v is None or isinstance(v, str) else str(v) for v in values]
    try:
        return Dataset.from_dict(columns)
    except (TypeError, ValueError) as error:  # pyarrow's ArrowInvalid / ArrowTypeError derive from these
        bad = next(key for key in keys if not _builds(columns[key]))
        raise DataError(
            f"{origin}: column `{bad}` mixes values of different kinds across rows ({error}); write it with one kind "
            "(e.g. always a string, or always a list) in every row."
        ) from None


def _builds(values: list[Any]) -> bool:
    try:
        Dataset.from_dict({"column": values})
    except (TypeError, ValueError):
        return False
    return True


def _hub_origin(spec: BenchmarkSpec, load_kwargs: dict[str, Any]) -> str:
    revision = load_kwargs.get("revision")
    return f"{spec.hub_id}{f'@{revision}' if revision else ''} (Hub)"


def _load_hub(
    spec: BenchmarkSpec, split: str, streaming: bool, load_kwargs: dict[str, Any]
) -> Dataset | IterableDataset:
    try:
        return datasets.load_dataset(spec.hub_id, spec.config, split=split, streaming=streaming, **load_kwargs)
    except DatasetNotFoundError as error:  # no such dataset or revision, or a private one without a token
        raise DataError(
            f"{spec.name}: cannot load {_hub_origin(spec, load_kwargs)}, config={spec.config}, split={split}: "
            f"{str(error).splitlines()[0]} Check the dataset id and revision (log in with `hf auth login` for a "
            f"private dataset), or pass `data_files` with local files in its raw schema (columns: "
            f"{', '.join(spec.raw_columns)})."
        ) from error


def _load_raw(
    spec: BenchmarkSpec,
    data_files: str | list[str] | None,
    split: str | None,
    streaming: bool,
    load_kwargs: dict[str, Any],
) -> Dataset | IterableDataset:
    """One benchmark's rows in its own raw schema, from local files or the Hub."""
    if data_files is not None:
        files = _as_file_list(data_files)
        missing = [f for f in files if not any(c in f for c in "*?[") and not os.path.exists(f)]
        if missing:
            raise FileNotFoundError(f"{spec.name}: data files not found: {missing}")
        if all(f.lower().endswith(".jsonl") and not any(c in f for c in "*?[") for f in files):
            # Read line by line, so that one bad line is skipped (and counted) rather than failing the whole file.
            if streaming:
                return IterableDataset.from_generator(_iter_jsonl, gen_kwargs={"files": files})
            rows = list(_iter_jsonl(files))
            if not rows:
                raise DataError(
                    f"{spec.name}: no JSON object could be read from {files} (see the skipped lines above). Write "
                    "one JSON object per line, UTF-8 encoded."
                )
            return _rows_to_dataset(rows, ", ".join(files))
        # Local files form a single split, which `datasets` names "train".
        return datasets.load_dataset(
            _builder_for(files), data_files=files, split="train", streaming=streaming, **load_kwargs
        )
    if spec.hub_id is None:
        raise ValueError(f"{spec.name} has no Hub id; pass `data_files` with local files in its raw schema.")
    hub_split = split or spec.split
    if hub_offline("datasets"):
        hint = (
            f"Cannot load {spec.name!r} ({spec.hub_id}, config={spec.config}, split={hub_split}) from the Hub: "
            f"offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and it is not in the local cache. Pass "
            f"`data_files=` with local jsonl/parquet files in the dataset's raw schema (columns: "
            f"{', '.join(spec.raw_columns)}), or unset HF_HUB_OFFLINE to download it."
        )
        if not datasets.config.HF_HUB_OFFLINE:
            # The flag was set after `datasets` was imported, so `datasets` would still go online: stop here.
            raise ConnectionError(hint)
        try:  # offline `datasets` only looks at the local cache, and fails at once when the dataset is not there
            return _load_hub(spec, hub_split, streaming, load_kwargs)
        except (OSError, ValueError) as err:
            raise ConnectionError(hint) from err
    return _load_hub(spec, hub_split, streaming, load_kwargs)


def _normalize(
    raw: Dataset | IterableDataset,
    spec: BenchmarkSpec,
    origin: str,
    max_question_chars: int | None,
    verify_golds: bool,
) -> Dataset | IterableDataset:
    fn = partial(normalize_example, spec=spec)
    _check_columns(raw, spec, origin)
    if isinstance(raw, Dataset):
        ds = raw.map(fn, with_indices=True, remove_columns=raw.column_names, features=CANONICAL_FEATURES)
        return _drop_unusable(ds, spec, origin, max_question_chars, verify_golds)
    # Streamed features are often unknown, so the raw columns are dropped by selection rather than by name.
    ds = raw.map(fn, with_indices=True).select_columns(list(CANONICAL_COLUMNS)).cast(CANONICAL_FEATURES)
    ds = ds.filter(_DropLogger(spec.name, max_question_chars, verify_golds))
    if next(iter(ds.take(1)), None) is None:
        raise DataError(
            f"{spec.name}: the stream from {origin} has no row with a usable gold answer or tests and a usable "
            f"question (see the dropped rows above). {_schema_fix(spec)}"
        )
    return ds


def _check_columns(raw: Dataset | IterableDataset, spec: BenchmarkSpec, origin: str) -> None:
    """A `DataError` naming the missing columns when the data is not in the spec's raw schema."""
    columns = raw.column_names
    if columns is None:  # a stream whose features are not declared: its first row tells
        first = next(iter(raw.take(1)), None)
        if first is None:
            return
        columns = list(first)
    missing = [c for c in spec.raw_columns if c not in columns]
    if missing:
        raise DataError(
            f"{spec.name}: {origin} lacks the columns {missing} (it has {columns}). {_schema_fix(spec)} Files in "
            "that schema can be passed as `data_files`."
        )


def _drop_unusable(
    ds: Dataset, spec: BenchmarkSpec, origin: str, max_question_chars: int | None, verify_golds: bool
) -> Dataset:
    """Drops the rows that cannot be used (see the module docstring), with one logged count per reason."""
    columns = {key: list(ds[key]) for key in ("problem", "answer", "tests", "task")}
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    reasons = [_drop_reason(row, max_question_chars) for row in rows]
    example_bad_gold = None
    if verify_golds:
        math_rows = [i for i, reason in enumerate(reasons) if reason is None and rows[i]["task"] == "math"]
        golds = [rows[i]["answer"] for i in math_rows]
        for i, gold, parses in zip(math_rows, golds, check_golds(golds)):
            if parses is False:  # `None` (timed out) keeps the row: the gold is not shown to be bad
                reasons[i] = _UNPARSABLE_GOLD
                example_bad_gold = example_bad_gold or gold
    before = len(ds)
    kept = [i for i, reason in enumerate(reasons) if reason is None]
    if not kept:
        reasons_text = _describe_drops(reasons, example_bad_gold)
        raise DataError(
            f"{spec.name}: none of the {before} rows of {origin} is usable ({reasons_text}). {_schema_fix(spec)}"
        )
    if len(kept) < before:
        logger.warning(
            "%s: dropped %d of %d rows (%s).",
            spec.name,
            before - len(kept),
            before,
            _describe_drops(reasons, example_bad_gold),
        )
        ds = ds.select(kept)
    return ds


def _prefix_ids(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": f"{row['source']}/{row['id']}"}


def load_benchmark(
    name_or_spec: str | BenchmarkSpec,
    *,
    data_files: str | list[str] | dict[str, str | list[str]] | None = None,
    split: str | None = None,
    streaming: bool = False,
    limit: int | None = None,
    max_question_chars: int | None = DEFAULT_MAX_QUESTION_CHARS,
    verify_golds: bool = True,
    **load_kwargs: Any,
) -> Dataset | IterableDataset:
    """
    Load a benchmark in the canonical schema, from the Hub or from local files.

    Rows that cannot be used are dropped, with a logged count per reason (streamed: one warning per dropped row): a
    gold that is missing or cannot be extracted, an empty question, a question over `max_question_chars`, a maths
    gold math-verify cannot parse. Lines of a local `.jsonl` file that are blank, not UTF-8 or not a JSON object are
    skipped with a count per file. A [`DataError`] naming the data and the fix is raised when no usable row is left;
    a stream is read up to its first usable row to check this. With `HF_HUB_OFFLINE=1` and no `data_files`, only the
    local Hugging Face cache is tried and a `ConnectionError` naming `data_files` is raised at once when the dataset is
    not there.

    Args:
        name_or_spec (`str` or `BenchmarkSpec`):
            A key of `BENCHMARKS` or a spec (e.g. from `load_custom_dataset`).
        data_files (`str`, `list[str]` or `dict[str, str | list[str]]`, *optional*, defaults to `None`):
            Local jsonl/json/parquet/csv files in the benchmark's own raw schema (the Hub columns listed in its spec).
            For a composite benchmark such as `aime`, a dict from component name to its files.
        split (`str`, *optional*, defaults to `None`):
            Hub split, overriding the spec's; ignored for local files, which form one split, and for composite
            benchmarks.
        streaming (`bool`, *optional*, defaults to `False`):
            Return an `IterableDataset` that reads rows lazily.
        limit (`int`, *optional*, defaults to `None`):
            Keep only the first `limit` usable rows.
        max_question_chars (`int` or `None`, *optional*, defaults to `DEFAULT_MAX_QUESTION_CHARS`):
            Drop rows whose question (the `problem` shown to the model) is longer than this many characters; `None`
            keeps every length.
        verify_golds (`bool`, *optional*, defaults to `True`):
            Drop maths rows whose gold math-verify cannot parse, checked in the reward worker pool as `score_math`
            would read it (every completion of such a row would score `None`).
        **load_kwargs:
            Passed to `datasets.load_dataset` (e.g. `revision`, `cache_dir`); unused for local `.jsonl` files, which
            are read line by line.

    Returns:
        `datasets.Dataset` or `datasets.IterableDataset`: Rows with the columns of `CANONICAL_FEATURES`.

    Raises:
        [`DataError`]: no usable row is left, or the data lacks a column of the spec.
        `FileNotFoundError`: a file of `data_files` does not exist.
    """
    spec = get_spec(name_or_spec)
    if max_question_chars is not None and max_question_chars <= 0:
        raise ValueError(f"`max_question_chars` must be > 0 or None, got {max_question_chars}.")
    if limit is not None and limit < 0:
        raise ValueError(f"`limit` must be >= 0, got {limit}.")
    if spec.sources:
        if data_files is not None and not isinstance(data_files, dict):
            raise ValueError(
                f"{spec.name} combines {', '.join(spec.sources)}: pass `data_files` as a dict from component name "
                "to files."
            )
        files = data_files or {}
        unknown = set(files) - set(spec.sources)
        if unknown:
            raise ValueError(f"{spec.name}: `data_files` names unknown components {sorted(unknown)}.")
        parts = [
            load_benchmark(
                src,
                data_files=files.get(src),
                split=None,
                streaming=streaming,
                max_question_chars=max_question_chars,
                verify_golds=verify_golds,
                **load_kwargs,
            ).map(_prefix_ids)
            for src in spec.sources
        ]
        ds = datasets.concatenate_datasets(parts)
    else:
        if isinstance(data_files, dict):
            raise ValueError(f"{spec.name}: `data_files` must be a path or a list of paths.")
        if data_files is None and spec.data_files is not None:
            data_files = list(spec.data_files) if isinstance(spec.data_files, tuple) else spec.data_files
        origin = ", ".join(_as_file_list(data_files)) if data_files is not None else _hub_origin(spec, load_kwargs)
        raw = _load_raw(spec, data_files, split, streaming, load_kwargs)
        ds = _normalize(raw, spec, origin, max_question_chars, verify_golds)
    if limit is not None:
        ds = ds.take(limit) if isinstance(ds, IterableDataset) else ds.select(range(min(limit, len(ds))))
    return ds


def _looks_local(path: str) -> bool:
    return os.path.exists(path) or any(path.lower().endswith(ext) for ext in (*_BUILDERS, ".gz"))


def local_benchmark(
    data_files: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    name: str | None = None,
    question_column: str = "problem",
    answer_column: str = "answer",
    answer_format: AnswerFormat = "plain",
    id_column: str | None = None,
    notes: str = "",
) -> BenchmarkSpec:
    """
    A maths benchmark that lives in local files only, to evaluate without adding it to `BENCHMARKS`.

    Pass the spec wherever a benchmark name goes: `load_benchmark(spec)`, or
    `ilr.evaluate.EvalConfig(benchmarks=[spec], ...)`, which reads its files and records them in the results.

    Args:
        data_files (`str`, `os.PathLike` or a sequence of them):
            Local jsonl/json/parquet/csv file(s), one split.
        name (`str`, *optional*):
            The benchmark's name in results and details files; defaults to the first file's stem.
        question_column (`str`, *optional*, defaults to `"problem"`):
            Column with the problem text.
        answer_column (`str`, *optional*, defaults to `"answer"`):
            Column with the gold answer, or with a solution to extract it from.
        answer_format (`str`, *optional*, defaults to `"plain"`):
            `"plain"`, `"boxed"`, `"gsm8k"` or `"list"`; see [`BenchmarkSpec`].
        id_column (`str`, *optional*):
            Id column; the row index is used when `None`.
        notes (`str`, *optional*, defaults to `""`):
            Provenance and caveats.

    Returns:
        [`BenchmarkSpec`]: The spec, with its files in `data_files`.
    """
    paths = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
    files = [os.fspath(path) for path in paths]
    if not files:
        raise ValueError("`local_benchmark` needs at least one file.")
    return BenchmarkSpec(
        name=name or Path(files[0]).name.split(".")[0],
        hub_id=None,
        question_column=question_column,
        answer_column=answer_column,
        answer_format=answer_format,
        id_column=id_column,
        notes=notes,
        data_files=files[0] if len(files) == 1 else tuple(files),
    )


def load_custom_dataset(
    path_or_hub_id: str | list[str],
    *,
    question_column: str,
    answer_column: str,
    answer_format: AnswerFormat = "plain",
    config: str | None = None,
    split: str = "train",
    id_column: str | None = None,
    name: str | None = None,
    streaming: bool = False,
    limit: int | None = None,
    **load_kwargs: Any,
) -> Dataset | IterableDataset:
    """
    Load a maths dataset that is not in the registry, in the canonical schema.

    Args:
        path_or_hub_id (`str` or `list[str]`):
            A Hub dataset id, or local jsonl/json/parquet/csv file(s) (recognised by existing or by their suffix).
        question_column (`str`):
            Column with the problem text.
        answer_column (`str`):
            Column with the gold answer, or with a solution to extract it from.
        answer_format (`str`, *optional*, defaults to `"plain"`):
            `"plain"`, `"boxed"`, `"gsm8k"` or `"list"`; see [`BenchmarkSpec`].
        config (`str`, *optional*, defaults to `None`):
            Hub config name.
        split (`str`, *optional*, defaults to `"train"`):
            Hub split; ignored for local files.
        id_column (`str`, *optional*, defaults to `None`):
            Id column; the row index is used when `None`.
        name (`str`, *optional*, defaults to `None`):
            Value of the `source` column; defaults to the file stem or the Hub id.
        streaming (`bool`, *optional*, defaults to `False`):
            Return an `IterableDataset`.
        limit (`int`, *optional*, defaults to `None`):
            Keep only the first `limit` usable rows.
        **load_kwargs:
            Passed to [`load_benchmark`] (`max_question_chars`, `verify_golds`) and on to `datasets.load_dataset`.

    Returns:
        `datasets.Dataset` or `datasets.IterableDataset`: Rows with the columns of `CANONICAL_FEATURES`.
    """
    spec = local_benchmark(
        path_or_hub_id,
        name=name,
        question_column=question_column,
        answer_column=answer_column,
        answer_format=answer_format,
        id_column=id_column,
    )
    if isinstance(path_or_hub_id, str) and not _looks_local(path_or_hub_id):  # a Hub dataset: its id, config, split
        spec = dataclasses.replace(
            spec, name=name or path_or_hub_id, hub_id=path_or_hub_id, config=config, split=split, data_files=None
        )
    return load_benchmark(
        spec,
        streaming=streaming,
        limit=limit,
        **load_kwargs,
    )


# ---------------------------------------------------------------------------------------------------------------------
# MATH 11k / 1k split


def canonical_row_bytes(row: dict[str, Any]) -> bytes:
    """
    The content of a canonical row that defines a problem (id, text, gold, tests, setup, entry point, task), as one
    line of sorted JSON: hashing these lines fingerprints a dataset (evaluation results, the IRT cache key).

    Args:
        row (`dict`):
            A row in the canonical schema.

    Returns:
        `bytes`: UTF-8 JSON ending with a newline.
    """
    fields = {key: row[key] for key in ("id", "problem", "answer", "tests", "setup", "entry_point", "task")}
    return json.dumps(fields, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n"


def normalize_problem_text(text: str) -> str:
    """
    Key used to match problems across datasets: whitespace runs collapsed to one space, ends stripped.

    Args:
        text (`str`):
            A problem statement.

    Returns:
        `str`: The normalised text.
    """
    return " ".join(text.split())


def _split_key(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}\x00{text}".encode()).hexdigest()


def make_math_split(
    pool: Dataset,
    exclude_problems: Iterable[str] | Dataset,
    *,
    seed: int = 42,
    validation_size: int = 1000,
) -> DatasetDict:
    """
    Build the paper's MATH training/validation split: the 12,500 MATH problems minus MATH-500, shuffled, then
    `validation_size` problems for validation and the rest (11,000 with the defaults) for training.

    Problems are matched by [`normalize_problem_text`]. Duplicates in the pool are kept once (first occurrence), so
    the same problem can never sit in both splits. The shuffle orders problems by SHA-256 of the seed and the
    normalised text: it depends neither on the pool's row order nor on library versions, so it is the same on every
    run and machine, and a different seed gives a different split.

    Args:
        pool (`datasets.Dataset`):
            The MATH pool with a `problem` column, e.g. `load_benchmark("math_train")`.
        exclude_problems (`Iterable[str]` or `datasets.Dataset`):
            Problems to hold out (MATH-500); a dataset's `problem` column is used.
        seed (`int`, *optional*, defaults to `42`):
            Shuffle seed.
        validation_size (`int`, *optional*, defaults to `1000`):
            Number of validation problems.

    Returns:
        `datasets.DatasetDict`: With `train` and `validation` splits, in shuffled order.
    """
    if isinstance(exclude_problems, Dataset):
        exclude_problems = exclude_problems["problem"]
    excluded = {normalize_problem_text(p) for p in exclude_problems}
    keyed: dict[str, int] = {}
    duplicates = n_removed = 0
    matched: set[str] = set()
    for index, problem in enumerate(pool["problem"]):
        text = normalize_problem_text(problem)
        if text in excluded:
            matched.add(text)
            n_removed += 1
        elif text in keyed:
            duplicates += 1
        else:
            keyed[text] = index
    logger.info(
        "MATH split: %d pool rows, %d removed as held out (%d of %d held-out problems found), %d duplicates dropped.",
        len(pool),
        n_removed,
        len(matched),
        len(excluded),
        duplicates,
    )
    if len(matched) < len(excluded):
        logger.warning("MATH split: %d held-out problems were not found in the pool.", len(excluded) - len(matched))
    if validation_size < 0 or validation_size > len(keyed):
        raise ValueError(f"validation_size={validation_size} but only {len(keyed)} problems remain after exclusion.")
    order = sorted(keyed, key=lambda text: (_split_key(seed, text), text))
    indices = [keyed[text] for text in order]
    return DatasetDict(
        train=pool.select(indices[validation_size:]),
        validation=pool.select(indices[:validation_size]),
    )


def load_math_split(
    *,
    pool_files: str | list[str] | None = None,
    exclude_files: str | list[str] | None = None,
    seed: int = 42,
    validation_size: int = 1000,
    **load_kwargs: Any,
) -> DatasetDict:
    """
    Load the MATH pool and MATH-500 (Hub or local files) and build the 11k/1k split with [`make_math_split`].

    Every MATH-500 problem is held out, whether or not its gold could be extracted.

    Args:
        pool_files (`str` or `list[str]`, *optional*, defaults to `None`):
            Local files of the full MATH pool in `math_train`'s raw schema (both original splits); Hub if `None`.
        exclude_files (`str` or `list[str]`, *optional*, defaults to `None`):
            Local MATH-500 files in `math500`'s raw schema; Hub if `None`.
        seed (`int`, *optional*, defaults to `42`):
            Shuffle seed.
        validation_size (`int`, *optional*, defaults to `1000`):
            Number of validation problems.
        **load_kwargs:
            Passed to `datasets.load_dataset`.

    Returns:
        `datasets.DatasetDict`: `train` and `validation` in the canonical schema.
    """
    pool = load_benchmark("math_train", data_files=pool_files, **load_kwargs)
    spec = BENCHMARKS["math500"]
    held_out = _load_raw(spec, exclude_files, None, False, load_kwargs)[spec.question_column]
    return make_math_split(pool, held_out, seed=seed, validation_size=validation_size)


# ---------------------------------------------------------------------------------------------------------------------
# Prompts


def build_prompt(
    example: dict[str, Any], *, system_prompt: str | None = None, template: str | None = None
) -> list[dict[str, str]]:
    """
    Chat messages for the plain single-agent prompt, used at evaluation and as the Idea3 "share" prompt.

    Args:
        example (`dict`):
            A canonical row; its string fields except `answer` fill the template's placeholders (`$problem`,
            `$entry_point`, ...).
        system_prompt (`str`, *optional*, defaults to `None`):
            Put first as a system message when given.
        template (`str`, *optional*, defaults to `None`):
            Template name in `ilr/prompts`; defaults to `math_single` or `code_single` after the row's `task`.

    Returns:
        `list[dict[str, str]]`: `[{"role": "system", ...}, {"role": "user", "content": ...}]`, system optional.
    """
    if template is None:
        task = example.get("task", "math")
        if task not in _TEMPLATES:
            raise ValueError(f"Unknown task {task!r}; expected one of {sorted(_TEMPLATES)}.")
        template = _TEMPLATES[task]
    # The gold answer is never offered to a template, so no prompt can leak it.
    fields = {k: v for k, v in example.items() if isinstance(v, str) and k != "answer"}
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": render(template, **fields)})
    return messages


def add_prompt_column(
    dataset: Dataset | IterableDataset, *, system_prompt: str | None = None, template: str | None = None
) -> Dataset | IterableDataset:
    """
    Add a conversational `prompt` column, so the dataset plugs into TRL's `GRPOTrainer` directly (the other columns
    reach the reward functions as keyword arguments).

    Args:
        dataset (`datasets.Dataset` or `datasets.IterableDataset`):
            Canonical rows, e.g. from [`load_benchmark`].
        system_prompt (`str`, *optional*, defaults to `None`):
            System message prepended to every prompt.
        template (`str`, *optional*, defaults to `None`):
            Template name; defaults after each row's `task`, see [`build_prompt`].

    Returns:
        `datasets.Dataset` or `datasets.IterableDataset`: The dataset with a `prompt` column of chat messages.
    """
    return dataset.map(lambda row: {"prompt": build_prompt(row, system_prompt=system_prompt, template=template)})

"""The registry of benchmarks: where each lives on the Hub and how its raw columns map onto `ilr.data`'s schema.

Data only (no `datasets` import), so that `ilr check` can validate a recipe's `dataset_name` in milliseconds; the
loaders are in `ilr.data`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


__all__ = ["ANSWER_FORMATS", "BENCHMARKS", "AnswerFormat", "BenchmarkSpec", "Task", "TestsFormat"]

Task = Literal["math", "code"]
AnswerFormat = Literal["plain", "boxed", "gsm8k", "list"]
TestsFormat = Literal["mbpp", "humaneval"]

ANSWER_FORMATS = ("plain", "boxed", "gsm8k", "list")


@dataclass(frozen=True)
class BenchmarkSpec:
    """
    Where a benchmark lives and how its raw rows map onto the canonical schema.

    Args:
        name (`str`):
            Registry key, written to the `source` column.
        hub_id (`str` or `None`):
            Hugging Face Hub dataset id; `None` for composite benchmarks or local-only data.
        config (`str` or `None`, *optional*, defaults to `None`):
            Hub config (subset) name.
        split (`str`, *optional*, defaults to `"test"`):
            Hub split; `datasets` split syntax such as `"train+test"` is allowed.
        task (`str`, *optional*, defaults to `"math"`):
            `"math"` or `"code"`.
        question_column (`str`, *optional*, defaults to `"problem"`):
            Raw column holding the problem text (task text for MBPP, prompt for HumanEval).
        answer_column (`str` or `None`, *optional*, defaults to `"answer"`):
            Raw column holding the gold answer (maths only).
        answer_format (`str`, *optional*, defaults to `"plain"`):
            How to read the gold from `answer_column`: `"plain"` (the value as is; lists joined with `", "`),
            `"boxed"` (last `\\boxed{}` of a solution), `"gsm8k"` (text after `#### `, commas removed) or `"list"`
            (a list of answers, each stripped of enclosing `$`, joined with `", "`).
        fallback_answer_column (`str` or `None`, *optional*, defaults to `None`):
            Column read with `fallback_answer_format` when the main one yields no gold.
        fallback_answer_format (`str`, *optional*, defaults to `"boxed"`):
            Format of `fallback_answer_column`.
        id_column (`str` or `None`, *optional*, defaults to `None`):
            Raw id column; the row index is used when `None`.
        tests_column (`str` or `None`, *optional*, defaults to `None`):
            Raw column with the tests (code only).
        tests_format (`str`, *optional*, defaults to `"mbpp"`):
            `"mbpp"` (a list of assert statements; the first is shown in the problem) or `"humaneval"` (a
            `check(candidate)` program, split into single asserts by [`split_humaneval_tests`]).
        setup_column (`str` or `None`, *optional*, defaults to `None`):
            Raw column with setup code (a string or a list of lines).
        entry_point_column (`str` or `None`, *optional*, defaults to `None`):
            Raw column naming the function under test; otherwise inferred from the tests and `code_column`.
        code_column (`str` or `None`, *optional*, defaults to `None`):
            Raw column with the reference solution, used only to infer the entry point.
        n_expected (`int` or `None`, *optional*, defaults to `None`):
            Number of rows in the official split, for sanity checks and documentation.
        sources (`tuple[str, ...]`, *optional*, defaults to `()`):
            For a composite benchmark: the registry names whose rows are concatenated, in order.
        notes (`str`, *optional*, defaults to `""`):
            Provenance and caveats.
        data_files (`str`, `tuple[str, ...]` or `None`, *optional*, defaults to `None`):
            The local files of a benchmark that lives in files only (`ilr.data.local_benchmark`); read when no
            `data_files` are passed to `ilr.data.load_benchmark`.
    """

    name: str
    hub_id: str | None
    config: str | None = None
    split: str = "test"
    task: Task = "math"
    question_column: str = "problem"
    answer_column: str | None = "answer"
    answer_format: AnswerFormat = "plain"
    fallback_answer_column: str | None = None
    fallback_answer_format: AnswerFormat = "boxed"
    id_column: str | None = None
    tests_column: str | None = None
    tests_format: TestsFormat = "mbpp"
    setup_column: str | None = None
    entry_point_column: str | None = None
    code_column: str | None = None
    n_expected: int | None = None
    sources: tuple[str, ...] = field(default=())
    notes: str = ""
    data_files: str | tuple[str, ...] | None = None

    def __post_init__(self):
        if self.task not in ("math", "code"):
            raise ValueError(f"{self.name}: task must be 'math' or 'code', got {self.task!r}.")
        for fmt in (self.answer_format, self.fallback_answer_format):
            if fmt not in ANSWER_FORMATS:
                raise ValueError(f"{self.name}: answer format must be one of {ANSWER_FORMATS}, got {fmt!r}.")
        if self.tests_format not in ("mbpp", "humaneval"):
            raise ValueError(f"{self.name}: tests_format must be 'mbpp' or 'humaneval', got {self.tests_format!r}.")
        if self.task == "math" and not self.sources and self.answer_column is None:
            raise ValueError(f"{self.name}: a maths benchmark needs an answer_column.")
        if self.task == "code" and not self.sources and self.tests_column is None:
            raise ValueError(f"{self.name}: a code benchmark needs a tests_column.")

    @property
    def raw_columns(self) -> tuple[str, ...]:
        """The raw columns this spec reads (the fallback answer column is optional)."""
        cols = (
            self.question_column,
            self.answer_column if self.task == "math" else None,
            self.id_column,
            self.tests_column,
            self.setup_column,
            self.entry_point_column,
        )
        return tuple(c for c in cols if c)


BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in [
        BenchmarkSpec(
            name="gsm8k",
            hub_id="openai/gsm8k",
            config="main",
            split="test",
            question_column="question",
            answer_column="answer",
            answer_format="gsm8k",
            n_expected=1319,
            notes="Columns question/answer; the answer is a worked solution ending in '#### <number>'.",
        ),
        BenchmarkSpec(
            name="math500",
            hub_id="HuggingFaceH4/MATH-500",
            split="test",
            question_column="problem",
            answer_column="answer",
            fallback_answer_column="solution",
            fallback_answer_format="boxed",
            id_column="unique_id",
            n_expected=500,
            notes="PRM800K's 500-problem subset of the MATH test split. Columns problem/solution/answer/subject/"
            "level/unique_id.",
        ),
        BenchmarkSpec(
            name="minerva",
            hub_id="math-ai/minervamath",
            split="test",
            question_column="question",
            answer_column="answer",
            n_expected=272,
            notes="Minerva Math (OCWCourses). Columns question/answer; no id column.",
        ),
        BenchmarkSpec(
            name="olympiadbench",
            hub_id="Hothan/OlympiadBench",
            config="OE_TO_maths_en_COMP",
            split="train",
            question_column="question",
            answer_column="final_answer",
            answer_format="list",
            id_column="id",
            n_expected=675,
            notes="Open-ended, text-only, English maths competition subset; the mirror ships it as the 'train' split. "
            "final_answer is a list of strings (several for is_multiple_answer rows); the unit and context columns "
            "are not used.",
        ),
        BenchmarkSpec(
            name="aime24",
            hub_id="HuggingFaceH4/aime_2024",
            split="train",
            question_column="problem",
            answer_column="answer",
            id_column="id",
            n_expected=30,
            notes="AIME 2024 I+II. Columns id/problem/solution/answer/url/year; only a 'train' split.",
        ),
        BenchmarkSpec(
            name="aime25",
            hub_id="math-ai/aime25",
            split="test",
            question_column="problem",
            answer_column="answer",
            id_column="id",
            n_expected=30,
            notes="AIME 2025 I+II. Columns problem/answer/id.",
        ),
        BenchmarkSpec(
            name="aime",
            hub_id=None,
            sources=("aime24", "aime25"),
            n_expected=60,
            notes="AIME 2024 + 2025 as one 60-problem benchmark, as reported in the paper: the rows of aime24 then "
            "aime25, ids prefixed with their source; `source` keeps the year for per-year breakdowns.",
        ),
        BenchmarkSpec(
            name="mbpp",
            hub_id="google-research-datasets/mbpp",
            config="full",
            split="test",
            task="code",
            question_column="text",
            answer_column=None,
            id_column="task_id",
            tests_column="test_list",
            setup_column="test_setup_code",
            code_column="code",
            n_expected=500,
            notes="Full MBPP test split (task ids 11-510). challenge_test_list is not used.",
        ),
        BenchmarkSpec(
            name="mbpp_sanitized",
            hub_id="google-research-datasets/mbpp",
            config="sanitized",
            split="test",
            task="code",
            question_column="prompt",
            answer_column=None,
            id_column="task_id",
            tests_column="test_list",
            setup_column="test_imports",
            code_column="code",
            n_expected=257,
            notes="Hand-verified MBPP subset; test_imports is a list of import lines.",
        ),
        BenchmarkSpec(
            name="humaneval",
            hub_id="openai/openai_humaneval",
            split="test",
            task="code",
            question_column="prompt",
            answer_column=None,
            id_column="task_id",
            tests_column="test",
            tests_format="humaneval",
            entry_point_column="entry_point",
            code_column="canonical_solution",
            n_expected=164,
            notes="Columns task_id/prompt/canonical_solution/test/entry_point. The completion is judged as a whole "
            "program, so the prompt (signature + docstring) is the problem.",
        ),
        BenchmarkSpec(
            name="math_train",
            hub_id="DigitalLearningGmbH/MATH-lighteval",
            config="default",
            split="train+test",
            question_column="problem",
            answer_column="solution",
            answer_format="boxed",
            n_expected=12500,
            notes="The full MATH pool (train 7,500 + test 5,000), columns problem/level/solution/type. Gold is the "
            "last \\boxed{} of the solution. Use `load_math_split` for the paper's 11k/1k split without MATH-500.",
        ),
    ]
}

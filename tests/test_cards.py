"""Eval cards (`ilr card`), the chart, the deviations section, leaderboards (`ilr compare`) and card pushes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard, metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results

from ilr import cli
from ilr.cards import (
    CHART_FILE,
    DEVIATIONS_HEADING,
    build_card,
    paper_deviations,
    render_chart,
    render_leaderboard,
    write_card,
)
from ilr.data import build_prompt, load_benchmark
from ilr.evaluate import MATH_AVG_BENCHMARKS, EvalConfig, load_results, run_evaluation
from ilr.generation import BackendStats, Completion, GenerationBackend, GenerationOutput


FIXTURES = Path(__file__).parent / "fixtures" / "data"
REPO = Path(__file__).resolve().parents[1]


class GoldBackend(GenerationBackend):
    """A fake model that answers a problem right when `right(index of its gold)` says so."""

    def __init__(self, name: str, golds: dict[str, str], right):
        self.name, self.tokenizer, self.stats, self.eos_token_ids = name, None, BackendStats(), [0]
        self.golds, self.right = golds, right

    def generate(self, prompts, params):
        texts = []
        for messages in prompts:
            gold = self.golds[messages[-1]["content"]]
            texts.append(f"\\boxed{{{gold}}}" if self.right(gold) else "\\boxed{-12345}")
        return GenerationOutput([[1] for _ in prompts], [[Completion(t, [1, 2], [0.0, 0.0], "stop")] for t in texts])

    def update_weights(self, model):
        pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Results files of a "trained" model (every answer right) and its base (right on some), on the five maths
    benchmarks of the paper's Avg (the fixture files)."""
    root = tmp_path_factory.mktemp("card_runs")
    data_files = {name: str(FIXTURES / f"{name}.jsonl") for name in MATH_AVG_BENCHMARKS if name != "aime"}
    data_files["aime"] = {src: str(FIXTURES / f"{src}.jsonl") for src in ("aime24", "aime25")}
    golds = {}
    for name, files in data_files.items():
        for row in load_benchmark(name, data_files=files):
            golds[build_prompt(row)[-1]["content"]] = row["answer"]
    paths = {}
    for label, right in (("trained", lambda gold: True), ("base", lambda gold: len(gold) % 2 == 0)):
        config = EvalConfig(
            model=f"org/{label}-model",
            name=label,
            benchmarks=["math_avg"],
            data_files=data_files,
            output_dir=str(root / label),
            n_resamples=300,
            command=f"ilr evaluate --model org/{label}-model --benchmarks math_avg",
        )
        run_evaluation(config, backends=[GoldBackend(label, golds, right)])
        paths[label] = root / label / f"results_{label}.json"
    return paths


@pytest.fixture
def recipe(tmp_path) -> Path:
    path = tmp_path / "config_pair.yaml"
    agents = [
        {"model_name_or_path": "meta-llama/Llama-3.1-8B-Instruct", "name": "llama-8b"},
        {"model_name_or_path": "Qwen/Qwen2.5-7B-Instruct", "name": "qwen-7b"},
    ]
    path.write_text(yaml.safe_dump({"agents": agents, "method": "ilr", "interaction_mode": "dynamic"}))
    return path


def test_card_renders_with_results_table_chart_recipe_and_deviations(runs, recipe, tmp_path):
    files = write_card(runs["trained"], tmp_path / "card", base_results_path=runs["base"], recipe_path=recipe)
    text = files["README.md"].read_text()
    # Results table: every benchmark with its interval, the base column and paired deltas, then Avg.
    for title in ("GSM8K", "MATH-500", "Minerva Math", "OlympiadBench", "AIME 24+25"):
        assert re.search(
            rf"^\| {re.escape(title)} \| \d+ \| 100\.00 \| \[100\.00, 100\.00\] \| [\d.]+ \| \+[\d.]+ \| \[",
            text,
            re.M,
        )
    assert re.search(
        r"^\| \*\*Avg\*\* \(5 maths\) \|  \| \*\*100\.00\*\* \| .* \| \+[\d.]+ \| \[[\d.]+, [\d.]+\] \|$", text, re.M
    )
    assert "Δ vs base" in text and "(paired)" in text
    assert f"![Accuracy per benchmark with 95% intervals]({CHART_FILE})" in text
    # Recipe and pairing.
    assert "- `llama-8b`: `meta-llama/Llama-3.1-8B-Instruct`" in text and "```yaml" in text
    # Deviations: the README section itself, the one place it is written.
    assert "## Deviations from the paper" in text
    assert paper_deviations() in text
    assert "ilr evaluate --model org/trained-model --benchmarks math_avg" in text
    assert files[CHART_FILE].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_card_metadata_is_a_valid_model_index_that_round_trips(runs, tmp_path):
    results = load_results(runs["trained"])
    card = build_card(results, base_results=load_results(runs["base"]))
    reparsed = ModelCard(str(card))  # parses and validates the YAML header
    assert reparsed.data.model_name == "trained"
    assert reparsed.data.base_model == "org/base-model"

    path = tmp_path / "README.md"
    card.save(path)
    metadata = metadata_load(path)
    model_name, eval_results = model_index_to_eval_results(metadata["model-index"])
    assert model_name == "trained"
    assert eval_results == card.data.eval_results
    by_dataset = {result.dataset_name: result for result in eval_results}
    assert set(by_dataset) == {"GSM8K", "MATH-500", "Minerva Math", "OlympiadBench", "AIME 24+25"}
    gsm8k = by_dataset["GSM8K"]
    assert (gsm8k.dataset_type, gsm8k.dataset_config, gsm8k.dataset_split) == ("openai/gsm8k", "main", "test")
    assert (gsm8k.metric_type, gsm8k.metric_value) == ("accuracy", 100.0)
    assert gsm8k.task_type == "text-generation"


def test_chart_has_a_bar_group_per_benchmark_and_avg(runs, tmp_path):
    from matplotlib.image import imread

    path = render_chart(load_results(runs["trained"]), tmp_path / "chart.png", base_results=load_results(runs["base"]))
    image = imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 600  # 6 groups (5 benchmarks + Avg) widen the figure


def test_deviations_come_from_the_readme_section():
    readme = (REPO / "README.md").read_text()
    section = paper_deviations()
    assert f"## {DEVIATIONS_HEADING}" in readme and section in readme
    assert section.startswith("Everything the paper leaves open")
    assert paper_deviations("# T\n\n## Deviations and choices\n\n- one\n\n## Next\n\nx") == "- one"
    with pytest.raises(LookupError, match=DEVIATIONS_HEADING):
        paper_deviations("# A README without the section\n")


def test_compare_prints_a_markdown_leaderboard(runs, capsys, tmp_path):
    output = tmp_path / "board.md"
    assert cli.main(["compare", str(runs["base"]), str(runs["trained"]), "--output", str(output)]) == 0
    table = capsys.readouterr().out
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert lines[0] == "| Model | GSM8K | MATH-500 | Minerva Math | OlympiadBench | AIME 24+25 | Avg |"
    assert lines[2].startswith("| trained | 100.00 [100.00, 100.00] |")  # sorted by Avg, best first
    assert lines[3].startswith("| base |")
    assert output.read_text().strip() == table.strip()
    board = render_leaderboard([load_results(runs["base"])], labels=["mine"])
    assert "| mine |" in board


def test_card_cli_writes_the_card_and_a_failed_push_keeps_it(runs, recipe, tmp_path, monkeypatch, capsys, request):
    out = tmp_path / "card"
    argv = [
        "card",
        str(runs["trained"]),
        "--base",
        str(runs["base"]),
        "--config",
        str(recipe),
        "--output_dir",
        str(out),
    ]
    assert cli.main(argv) == 0
    assert (out / "README.md").is_file() and (out / CHART_FILE).is_file()

    # Offline (the test environment): the push fails at once, in one line, and the card stays on disk.
    (out / "README.md").unlink()
    assert cli.main([*argv, "--push", "--repo_id", "org/trained-model"]) == 2
    error = capsys.readouterr().err.strip()
    assert "HF_HUB_OFFLINE" in error and "stay on disk" in error and len(error.splitlines()) == 1
    assert (out / "README.md").is_file()

    # Online (the Hub test server), to a repository the token may not write to: refused in one line, the local files
    # untouched, nothing committed.
    from conftest import HUB_TOKEN

    hub = request.getfixturevalue("hub_online")
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    hub.publish("someone-else/trained-model", {"config.json": "{}"})
    before = (out / "README.md").read_bytes()
    assert cli.main([*argv, "--push", "--repo_id", "someone-else/trained-model"]) == 2
    error = capsys.readouterr().err.strip()
    assert "403 Forbidden" in error and "stay on disk" in error and len(error.splitlines()) == 1
    assert (out / "README.md").read_bytes() == before
    assert set(hub.files_at("someone-else/trained-model")) == {"config.json"}

    # To the model's own repository: the card and its chart land on main in one commit.
    hub.publish("org/trained-model", {"config.json": "{}"})
    assert cli.main([*argv, "--push", "--repo_id", "org/trained-model"]) == 0
    assert f"Pushed: {hub.url}/org/trained-model/commit/" in capsys.readouterr().out
    pushed = hub.files_at("org/trained-model")
    assert pushed["README.md"] == before and pushed[CHART_FILE] == (out / CHART_FILE).read_bytes()
    assert hub.commit_messages("org/trained-model")[0] == "Add ILR eval card"


def test_card_for_a_local_model_needs_a_repo_id_to_push(runs, tmp_path, capsys):
    results = json.loads(runs["trained"].read_text())
    results["model"]["name_or_path"] = str(tmp_path)
    local = tmp_path / "results_local.json"
    local.write_text(json.dumps(results))
    assert cli.main(["card", str(local), "--output_dir", str(tmp_path / "card"), "--push"]) == 2
    assert "pass `--repo_id org/name`" in capsys.readouterr().err

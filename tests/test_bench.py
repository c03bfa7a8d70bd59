"""The benchmarks run: `benchmarks/bench_ilr.py --quick` measures all three configurations with the right accounting,
and `benchmarks/gpu_check.py` plans a ~0.5B model and runs its tiny CPU path. No timing is asserted."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch


BENCHMARKS_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look modules up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def restore_threads(monkeypatch):
    # The scripts set torch's thread count and OMP_NUM_THREADS for their run: undo both for the tests that follow.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def test_bench_ilr_quick_measures_trl_and_ilr_side_by_side(tmp_path, restore_threads):
    bench = load_script("bench_ilr")
    configs = ["trl_grpo", "ilr_m2", "trl_same_m2", "ilr_m3"]  # trl_same_m3 is trl_same_m2's code with 3 agents
    report = bench.main(["--quick", "--output_dir", str(tmp_path), "--configs", *configs])

    written = json.loads((tmp_path / "bench_ilr.json").read_text())
    assert list(written["configs"]) == configs
    settings = written["settings"]
    completions = settings["questions"] * settings["num_generations"]
    for name, agents, stages in (("trl_grpo", 1, 1), ("ilr_m2", 2, 3), ("ilr_m3", 3, 3)):
        summary = written["configs"][name]
        assert summary["timed_steps"] == settings["repeats"] * settings["steps"]
        # Fixed-length completions (EOS masked): every stage of every agent generates exactly Q x G x T tokens.
        tokens = agents * stages * completions * settings["max_completion_length"]
        assert [step["generated_tokens"] for step in summary["steps"]] == [tokens] * summary["timed_steps"]
        assert summary["prompt_tokens_per_step"]["median"] > 0
        expected_calls = 1 if name == "trl_grpo" else stages * agents
        assert summary["expected_calls_per_step"] == expected_calls
        assert summary["calls_per_step"] == [expected_calls] and summary["calls_ok"]
        split = summary["time_split_s"]
        assert split["generation"] > 0 and split["update"] > 0 and split["scoring"] >= 0
        assert summary["ratio_vs_trl"] > 0
    # The same-work replay: TRL processed exactly the ILR step's prompts and generated tokens, batch by batch.
    ilr, same = written["configs"]["ilr_m2"], written["configs"]["trl_same_m2"]
    assert same["calls_per_step"] == [2 * 3] and same["calls_ok"]
    for ilr_step, same_step in zip(ilr["steps"], same["steps"], strict=True):
        assert same_step["prompt_tokens"] == ilr_step["prompt_tokens"]
        assert same_step["generated_tokens"] == ilr_step["generated_tokens"]
        ilr_batches = [(b["stage"], b["agent"], b["prompt_tokens"]) for b in ilr_step["batches"]]
        assert ilr_batches == [(b["stage"], b["agent"], b["prompt_tokens"]) for b in same_step["batches"]]
        assert {batch["stage"] for batch in ilr_step["batches"]} == set(bench.ILR_STAGES)
    assert set(written["ratios_vs_same_work"]) == {"ilr_m2"} and ilr["ratio_vs_same_work"] > 0
    assert ilr["peak_rss_mb"] > 0 and all(mb > 0 for mb in ilr["steps"][0]["agent_state_mb"])
    assert written["configs"]["trl_grpo"]["ratio_vs_trl"] == pytest.approx(1.0)
    assert set(written["ratios_vs_trl"]) == {"ilr_m2", "ilr_m3"}
    assert written["target_met"] == all(r <= bench.TARGET_RATIO for r in written["ratios_vs_trl"].values())
    assert report["configs"].keys() == written["configs"].keys()

    table = (tmp_path / "bench_ilr.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| ") and not line.startswith("| config")]
    assert [row.split("|")[1].strip() for row in rows if row.count("|") == 12] == configs
    stage_rows = [row.split("|")[1:4] for row in rows if row.count("|") == 11]
    assert [(c.strip(), s.strip()) for c, s, _ in stage_rows].count(("ilr_m2", "analyse")) == 2


def test_bench_ilr_rejects_a_group_of_one():
    bench = load_script("bench_ilr")
    with pytest.raises(SystemExit):
        bench.parse_args(["--num_generations", "1"])


def test_gpu_check_plans_a_half_billion_model_and_runs_tiny_on_cpu(tmp_path, restore_threads):
    gpu_check = load_script("gpu_check")
    plan = gpu_check.main(["--dry_run", "--device", "cpu", "--output_dir", str(tmp_path / "plan")])
    assert 0.4e9 < plan["parameters"]["total"] < 0.7e9  # realistic shape, counted on the meta device
    assert (tmp_path / "plan" / "gpu_check_plan.json").is_file()
    assert not (tmp_path / "plan" / "gpu_check.json").exists()

    report = gpu_check.main(["--device", "cpu", "--tiny", "--steps", "1", "--output_dir", str(tmp_path / "run")])
    written = json.loads((tmp_path / "run" / "gpu_check.json").read_text())
    assert written["summary"] == report["summary"]
    (step,) = written["steps"]
    settings = written["settings"]
    agents = settings["agents"]
    assert step["backend_calls"] == step["expected_backend_calls"] == 3 * agents
    # The padded vocabulary is suppressed in generation and the EOS masked: fixed-length, decodable completions.
    completions = settings["questions"] * settings["num_generations"]
    assert step["generated_tokens"] == 3 * agents * completions * settings["max_completion_length"]
    assert step["trained_completion_tokens"] == step["generated_tokens"]
    assert step["trained_prompt_tokens"] > 0 and step["update_s"] > 0
    assert written["tokenizer_vocab"] < written["model"]["vocab_size"]
    assert step["mfu"] is None  # no peak FLOPs for a CPU
    # `ilr plan`'s prediction is printed and kept beside the measured peak (which a GPU run fills in).
    predicted = written["predicted_memory"]
    assert predicted["peak_phase"] in ("generation", "update") and predicted["peak_gib"] > 0


def test_cli_startup_profile_attributes_import_time_to_packages():
    bench = load_script("bench_cli_startup")
    profile = dict(bench.import_profile([sys.executable, "-c", "import email.parser"], top=50))
    assert profile.get("email", 0) > 0  # email.parser and its submodules, summed under their package
    assert not any("." in package for package in profile)
    commands = bench._commands(bench.DEFAULT_RECIPE)
    assert list(commands) == ["baseline", "help", "check", "check_trl"] and bench.DEFAULT_RECIPE.is_file()

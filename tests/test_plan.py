"""`ilr plan`: model shapes, DeepSpeed's and vLLM's own sizing, measured memory on CPU, and every shipped GPU recipe."""

import json
import logging
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ilr.plan import (
    GB,
    Distribution,
    Hardware,
    ModelShape,
    activation_bytes,
    build_plan,
    model_state_bytes,
    plan_arguments,
    plan_from_arguments,
    warn_if_unfit,
)


ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
GPU_RECIPES = sorted(
    path for pattern in ("*/ilr/*.yaml", "*/grpo/*.yaml") for path in RECIPES.glob(pattern) if "demo" not in path.parts
)
HEADER = re.compile(r"^# ilr plan: (.+)$", re.MULTILINE)
# Published parameter counts (the models' cards on the Hub).
PUBLISHED_PARAMETERS = {
    "meta-llama/Llama-3.1-8B-Instruct": 8_030_261_248,
    "Qwen/Qwen2.5-7B-Instruct": 7_615_616_512,
    "Qwen/Qwen2.5-14B-Instruct": 14_770_033_664,
}


@pytest.fixture(scope="module")
def paper_shapes() -> dict[str, ModelShape]:
    from ilr.testing import paper_model_configs

    return {name: ModelShape.from_config(config) for name, config in paper_model_configs().items()}


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    settings = {
        "vocab_size": 8000,
        "hidden_size": 256,
        "intermediate_size": 768,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
    }
    return LlamaConfig(**{**settings, **overrides})


# ---------------------------------------------------------------------------------------------------------------------
# Shapes, DeepSpeed's estimators, vLLM's KV size
# ---------------------------------------------------------------------------------------------------------------------
def test_paper_model_shapes_match_the_published_sizes(paper_shapes):
    for name, count in PUBLISHED_PARAMETERS.items():
        assert paper_shapes[name].num_parameters == count, name
    llama = paper_shapes["meta-llama/Llama-3.1-8B-Instruct"]
    # The often-quoted 128 KiB of KV cache per token for Llama-3.1-8B in bf16.
    assert llama.kv_bytes_per_token(2) == 128 * 1024
    assert paper_shapes["Qwen/Qwen2.5-7B-Instruct"].kv_bytes_per_token(2) == 2 * 28 * 4 * 128 * 2
    # Tensor parallelism splits the KV heads; with fewer heads than ranks vLLM replicates them.
    assert llama.kv_bytes_per_token(2, tensor_parallel=2) == 64 * 1024
    assert llama.kv_bytes_per_token(2, tensor_parallel=16) == 2 * 32 * 1 * 128 * 2


def test_shape_counts_like_deepspeed_model_to_params():
    import torch
    from deepspeed.runtime.zero.stage3 import model_to_params
    from transformers import AutoModelForCausalLM

    for tied in (False, True):
        config = tiny_llama_config(tie_word_embeddings=tied)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        shape = ModelShape.from_config(config)
        assert (shape.num_parameters, shape.largest_layer_parameters) == model_to_params(model)


@pytest.mark.parametrize("gpus", [1, 6, 8, 16])
def test_model_states_equal_deepspeed_estimators(paper_shapes, gpus):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    for shape in paper_shapes.values():
        total, largest = shape.num_parameters, shape.largest_layer_parameters
        for offload in (False, True):
            ours = model_state_bytes(total, largest, Distribution("zero2", gpus, offload_optimizer=offload), gpus)
            _, expected = estimate_zero2_model_states_mem_needs(total, gpus, 1, cpu_offload=offload)
            assert sum(ours.values()) == pytest.approx(expected, abs=8), (gpus, offload)
            for offload_params in (False, True) if offload else (False,):
                distribution = Distribution("zero3", gpus, offload_optimizer=offload, offload_params=offload_params)
                ours = model_state_bytes(total, largest, distribution, gpus)
                _, expected, _ = estimate_zero3_model_states_mem_needs(
                    total, largest, gpus, 1, cpu_offload=offload, cpu_offload_params=offload_params
                )
                assert sum(ours.values()) == pytest.approx(expected, abs=8), (gpus, offload, offload_params)


def test_kv_bytes_equal_vllm_page_size(paper_shapes):
    pytest.importorskip("vllm")
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    for shape in paper_shapes.values():
        spec = FullAttentionSpec(
            block_size=16, num_kv_heads=shape.num_kv_heads, head_size=shape.head_dim, dtype=torch.bfloat16
        )
        assert shape.num_layers * spec.page_size_bytes // 16 == shape.kv_bytes_per_token(2)


def test_lora_parameters_count_the_adapters():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = tiny_llama_config()
    shape = ModelShape.from_config(config)
    for targets in (None, ["q_proj", "k_proj", "v_proj", "o_proj"], "all-linear"):
        model = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(r=8, target_modules=targets))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert shape.lora_parameters(8, targets) == trainable, targets


# ---------------------------------------------------------------------------------------------------------------------
# Measured: peak memory of a real update step on CPU, against the plan's terms
# ---------------------------------------------------------------------------------------------------------------------
STEP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    from ilr.logps import per_token_logps

    torch.set_num_threads(1)
    settings, rows, length, completion = json.loads(sys.argv[1])

    def step(config):
        model = AutoModelForCausalLM.from_config(config)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        ids = torch.randint(0, config.vocab_size, (rows, length))
        logps = per_token_logps(model, ids, torch.ones_like(ids), completion)
        (-logps.mean()).backward()
        optimizer.step()

    def status_kib(field):
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))

    step(LlamaConfig(**{**settings, "hidden_size": 32, "intermediate_size": 64, "vocab_size": 256}))  # warm-up
    # Reset the peak RSS to the current RSS (Linux `clear_refs` 5), so imports and the warm-up do not count.
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    before = status_kib("VmRSS")
    step(LlamaConfig(**settings))
    print(json.dumps((status_kib("VmHWM") - before) * 1024))
    """
)


def test_plan_predicts_the_measured_peak_memory_of_a_cpu_update():
    settings = {
        "vocab_size": 32000,
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "tie_word_embeddings": False,
        "dtype": "float32",
    }
    rows, length, completion = 4, 192, 128
    result = subprocess.run(
        [sys.executable, "-c", STEP_SCRIPT, json.dumps([settings, rows, length, completion])],
        capture_output=True,
        text=True,
        timeout=300,
        env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    shape = ModelShape.from_config(tiny_llama_config(**settings))
    states = model_state_bytes(
        shape.num_parameters, shape.largest_layer_parameters, Distribution(), 1, dtype_bytes=4, on_gpu=False
    )
    activations = activation_bytes(shape, rows, length, completion, gradient_checkpointing=True, dtype_bytes=4)
    predicted = sum(states.values()) + sum(activations.values())
    # Model states are ~1 GB here and exact; activations and allocator slack make up the difference.
    assert 0.85 < measured / predicted < 1.15, (measured / GB, predicted / GB, states, activations)


# ---------------------------------------------------------------------------------------------------------------------
# Recipes: every shipped GPU recipe fits the hardware its header names
# ---------------------------------------------------------------------------------------------------------------------
def recipe_plan_arguments(recipe: Path) -> list[str]:
    match = HEADER.search(recipe.read_text(encoding="utf-8"))
    assert match, f"{recipe} names no hardware: add a header line `# ilr plan: --accelerate_config ... --num_gpus ...`"
    return ["--config", str(recipe.relative_to(ROOT)), *shlex.split(match.group(1))]


@pytest.mark.parametrize("recipe", GPU_RECIPES, ids=lambda path: f"{path.parent.parent.name}/{path.name}")
def test_every_shipped_gpu_recipe_fits_its_hardware(recipe, paper_shapes, monkeypatch):
    monkeypatch.chdir(ROOT)
    plan = plan_from_arguments(recipe_plan_arguments(recipe), configs=paper_shapes)
    assert plan.fits, plan.render()
    assert plan.layout in ("colocate", "server")
    # The header states the plan's expectations: generated tokens per step and a rough step time.
    text = recipe.read_text(encoding="utf-8")
    assert f"{plan.estimate['generated_tokens'] / 1e6:.2f}M generated tokens" in text, plan.render()


def test_slurm_script_layout_fits_every_server_recipe(paper_shapes, monkeypatch):
    monkeypatch.chdir(ROOT)
    script = (RECIPES / "slurm" / "train_ilr.slurm").read_text(encoding="utf-8")
    accelerate_config = re.search(r"ACCELERATE_CONFIG=\$\{2:-([^}]+)\}", script).group(1)
    assert "ilr.cli plan" in script  # the job checks the plan before starting any server
    servers = [recipe for recipe in GPU_RECIPES if "generation_backend: vllm_server" in recipe.read_text()]
    assert servers
    for recipe in servers:
        options, _ = plan_arguments(recipe_plan_arguments(recipe))
        assert options.accelerate_config == accelerate_config, recipe
        plan = plan_from_arguments(recipe_plan_arguments(recipe), configs=paper_shapes)
        assert plan.fits and plan.layout == "server", plan.render()


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: what does not fit says what to change
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_recipe(tmp_path):
    model = tmp_path / "model"
    tiny_llama_config().save_pretrained(model)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        textwrap.dedent(
            f"""
            agents:
              - {{model_name_or_path: {model}, name: a, dtype: bfloat16}}
              - {{model_name_or_path: {model}, name: b, dtype: bfloat16}}
            method: ilr
            num_generations: 4
            per_device_train_batch_size: 4
            gradient_accumulation_steps: 2
            max_completion_length: 256
            gradient_checkpointing: true
            max_steps: 1
            generation_backend: vllm
            vllm_gpu_memory_utilization: 0.5
            vllm_max_model_length: 2048
            """
        )
    )
    return recipe


def test_ilr_plan_prints_the_table_and_exits_0_when_it_fits(tiny_recipe, capsys):
    from ilr.cli import main

    assert main(["plan", "--config", str(tiny_recipe), "--num_gpus", "1", "--gpu_memory_gb", "8"]) == 0
    out = capsys.readouterr().out
    assert "| a | vLLM weights (tp=1) |" in out and "FITS" in out


def test_ilr_plan_exits_2_naming_the_largest_term_and_the_setting(tiny_recipe, capsys):
    from ilr.cli import main

    # 0.1 GB: the engines' share is too small for one 2048-token sequence.
    assert main(["plan", "--config", str(tiny_recipe), "--num_gpus", "1", "--gpu_memory_gb", "0.1"]) == 2
    error = capsys.readouterr().err
    assert "vllm_gpu_memory_utilization" in error and "vllm_max_model_length" in error
    # A long micro-batch: the activations are named, with the setting to change.
    args = ["--config", str(tiny_recipe), "--num_gpus", "1", "--gpu_memory_gb", "6", "--max_completion_length", "1024"]
    args += ["--per_device_train_batch_size", "32", "--gradient_accumulation_steps", "1"]
    assert main(["plan", *args, "--generation_backend", "transformers"]) == 2
    error = capsys.readouterr().err
    assert "largest term: activations" in error and "per_device_train_batch_size" in error, error


def test_plan_of_a_missing_model_config_is_a_user_error(tmp_path, tiny_recipe, capsys):
    from ilr.cli import main

    text = tiny_recipe.read_text().replace(str(tmp_path / "model"), str(tmp_path / "missing"))
    tiny_recipe.write_text(text)
    assert main(["plan", "--config", str(tiny_recipe), "--num_gpus", "1"]) == 2
    assert "config.json" in capsys.readouterr().err


def test_sleep_mode_frees_the_engines_during_the_update(tiny_recipe):
    args = ["--config", str(tiny_recipe), "--num_gpus", "1", "--gpu_memory_gb", "8"]
    awake = plan_from_arguments(args)
    asleep = plan_from_arguments([*args, "--vllm_enable_sleep_mode", "true"])
    engines = sum(t.bytes for t in awake.terms if t.name.startswith("vLLM"))
    assert awake.total("training GPU", "update") - asleep.total("training GPU", "update") == pytest.approx(
        engines - 2 * 0.5 * GB
    )
    assert awake.total("training GPU", "generation") == asleep.total("training GPU", "generation")


def test_ilr_train_warns_before_loading_a_model(tiny_recipe, caplog):
    from ilr.configs import parse_recipe

    args = ["--config", str(tiny_recipe), "--generation_backend", "transformers", "--bf16", "false"]
    _, agents_args, training_args = parse_recipe(args)
    with caplog.at_level(logging.WARNING, logger="ilr.plan"):
        assert (
            warn_if_unfit(agents_args.agents, training_args, gpu_memory_bytes=int(0.5 * GB), environ={}).fits is False
        )
    assert "does not fit" in caplog.text and "per_device_train_batch_size" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ilr.plan"):
        assert warn_if_unfit(agents_args.agents, training_args, gpu_memory_bytes=80 * 10**9, environ={}).fits
    assert caplog.text == ""


def test_distribution_from_the_shipped_accelerate_configs():
    configs = RECIPES / "accelerate_configs"
    assert Distribution.from_accelerate_config(configs / "zero3.yaml") == Distribution("zero3", 8)
    assert Distribution.from_accelerate_config(configs / "zero2.yaml") == Distribution("zero2", 8)
    assert Distribution.from_accelerate_config(configs / "ddp.yaml") == Distribution("ddp", 8)
    assert Distribution.from_accelerate_config(configs / "cpu.yaml") == Distribution("single", 1)
    environ = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3", "WORLD_SIZE": "6"}
    assert Distribution.from_environment(environ) == Distribution("zero3", 6)


def test_group1_as_first_shipped_does_not_fit(paper_shapes, monkeypatch):
    """The issue's arithmetic: TRL's default engine share (0.3, split over two agents) under the 16 GB of Llama's
    weights, and ZeRO-3 colocated engines that leave no room."""
    from ilr.configs import parse_recipe

    monkeypatch.chdir(ROOT)
    recipe = RECIPES / "Llama-3.1-8B-Instruct_Qwen2.5-7B-Instruct" / "ilr" / "config_group1.yaml"
    args = ["--config", str(recipe), "--generation_backend", "transformers", "--bf16", "false"]
    _, agents_args, training_args = parse_recipe(args)
    training_args.generation_backend = "vllm"
    training_args.vllm_gpu_memory_utilization, training_args.vllm_enable_sleep_mode = 0.3, False
    plan = build_plan(
        agents_args.agents,
        training_args,
        paper_shapes,
        Distribution("zero3", 8),
        Hardware(num_gpus=8, gpu_memory_gb=80),
    )
    assert not plan.fits
    assert any("vLLM engine of `llama-8b`: 12.0 GB" in problem for problem in plan.problems), plan.problems

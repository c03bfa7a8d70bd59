"""A prompt shared by a group computed once: the same log-probabilities, gradients and updates as the full rows."""

import copy

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

import ilr.update
from ilr.configs import AgentConfig
from ilr.logps import grouped_per_token_logps, per_token_logps, supports_grouped_logps
from ilr.samples import TrainingSample, collate_samples
from ilr.trainer import ILRTrainer
from test_trainer import digits_reward, make_args, toy_rows


TEMPERATURE = 0.7
# Left padding: prompts of different lengths. Groups of different sizes, completions of different lengths.
PROMPT_LENGTHS = (7, 12, 3)
GROUP_SIZES = [3, 2, 4]
COMPLETION_WIDTH = 6


def _grouped_inputs(vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """One row per prompt (left-padded) and its completions (right-padded), plus the same as full rows."""
    generator = torch.Generator().manual_seed(seed)
    width = max(PROMPT_LENGTHS)
    prompt_ids = torch.zeros((len(PROMPT_LENGTHS), width), dtype=torch.long)
    prompt_mask = torch.zeros_like(prompt_ids)
    for row, length in enumerate(PROMPT_LENGTHS):
        prompt_ids[row, width - length :] = torch.randint(1, vocab_size, (length,), generator=generator)
        prompt_mask[row, width - length :] = 1
    rows = sum(GROUP_SIZES)
    completion_ids = torch.randint(1, vocab_size, (rows, COMPLETION_WIDTH), generator=generator)
    completion_mask = torch.ones_like(completion_ids)
    for row, length in enumerate([6, 2, 4, 1, 6, 5, 3, 6, 2]):
        completion_ids[row, length:] = 0
        completion_mask[row, length:] = 0
    repeats = torch.tensor(GROUP_SIZES)
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "input_ids": torch.cat([prompt_ids.repeat_interleave(repeats, dim=0), completion_ids], dim=1),
        "attention_mask": torch.cat([prompt_mask.repeat_interleave(repeats, dim=0), completion_mask], dim=1),
        "weights": torch.randn((rows, COMPLETION_WIDTH), generator=generator),
    }


def _logps_and_grads(model, inputs, grouped: bool, group_sizes=GROUP_SIZES):
    model.zero_grad(set_to_none=True)
    if grouped:
        logps = grouped_per_token_logps(
            model,
            inputs["prompt_ids"],
            inputs["prompt_mask"],
            inputs["completion_ids"],
            inputs["completion_mask"],
            group_sizes,
            TEMPERATURE,
        )
    else:
        logps = per_token_logps(model, inputs["input_ids"], inputs["attention_mask"], COMPLETION_WIDTH, TEMPERATURE)
    (logps * inputs["weights"]).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logps.detach(), grads


def _assert_same(model, inputs):
    full_logps, full_grads = _logps_and_grads(model, inputs, grouped=False)
    grouped_logps, grouped_grads = _logps_and_grads(model, inputs, grouped=True)
    assert (full_logps[inputs["completion_mask"] == 0] == 0).all()
    assert (full_logps[inputs["completion_mask"] == 1] < 0).all()
    torch.testing.assert_close(grouped_logps, full_logps, rtol=0, atol=1e-5)
    assert grouped_grads.keys() == full_grads.keys() and full_grads
    for name, grad in full_grads.items():
        scale = grad.abs().max().item()
        assert scale > 0, name
        # float32 rounding of sums in another order: ~1e-6 of the largest entry, elementwise.
        torch.testing.assert_close(grouped_grads[name], grad, rtol=0, atol=1e-5 * scale, msg=name)
    return full_logps


@pytest.mark.parametrize("which", ["a", "b"])
def test_grouped_logps_and_gradients_equal_the_full_rows(which, tiny_model_a, tiny_model_b, one_thread):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_a if which == "a" else tiny_model_b)
    model.train()
    assert supports_grouped_logps(model)
    inputs = _grouped_inputs(model.config.vocab_size)
    full_logps = _assert_same(model, inputs)

    # The comparison has teeth: completions put under the wrong prompts give other numbers.
    wrong_logps, _ = _logps_and_grads(model, inputs, grouped=True, group_sizes=[2, 3, 4])
    assert (wrong_logps - full_logps).abs().max() > 1e-3
    # An int is the same size for every prompt; sizes must cover the completion rows exactly.
    with pytest.raises(ValueError, match="group_sizes"):
        grouped_per_token_logps(
            model, inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"], inputs["completion_mask"], 2
        )


def test_grouped_logps_through_a_lora_adapter_and_without_it(tiny_model_a, one_thread):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_a), config)
    model.train()
    assert supports_grouped_logps(model)
    inputs = _grouped_inputs(model.config.vocab_size, seed=1)
    _assert_same(model, inputs)
    with torch.no_grad(), model.disable_adapter():  # the reference policy of a LoRA agent
        base = per_token_logps(model, inputs["input_ids"], inputs["attention_mask"], COMPLETION_WIDTH, TEMPERATURE)
        grouped = grouped_per_token_logps(
            model,
            inputs["prompt_ids"],
            inputs["prompt_mask"],
            inputs["completion_ids"],
            inputs["completion_mask"],
            GROUP_SIZES,
            TEMPERATURE,
        )
    torch.testing.assert_close(grouped, base, rtol=0, atol=1e-5)


def test_models_whose_cache_cannot_be_shared_are_refused(tiny_model_a):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_a)
    sliding = copy.deepcopy(model.config)
    sliding.sliding_window = 4
    assert not supports_grouped_logps(AutoModelForCausalLM.from_config(sliding))

    model.gradient_checkpointing_enable()
    model.train()
    assert not supports_grouped_logps(model)
    inputs = _grouped_inputs(model.config.vocab_size)
    with pytest.raises(ValueError, match="gradient checkpointing"):  # in training, transformers drops the cache
        grouped_per_token_logps(
            model,
            inputs["prompt_ids"],
            inputs["prompt_mask"],
            inputs["completion_ids"],
            inputs["completion_mask"],
            GROUP_SIZES,
        )


def test_collate_gives_one_prompt_row_per_run_of_a_shared_prompt():
    samples = [
        TrainingSample([1, 2, 3], [7, 8], 0.5, False, "fuse", 0),
        TrainingSample([1, 2, 3], [9], -0.5, False, "fuse", 0),
        TrainingSample([4], [9, 9, 9], 1.0, True, "fuse", 1),
        TrainingSample([1, 2, 3], [5], 0.0, False, "fuse", 0),  # not next to its group: its own row
    ]
    batch = collate_samples(samples, pad_token_id=0)
    assert batch.group_sizes == [2, 1, 1]
    assert batch.prompt_ids.tolist() == [[1, 2, 3], [0, 0, 4], [1, 2, 3]]
    assert batch.prompt_mask.tolist() == [[1, 1, 1], [0, 0, 1], [1, 1, 1]]
    assert batch.completion_ids.tolist() == [[7, 8, 0], [9, 0, 0], [9, 9, 9], [5, 0, 0]]
    assert batch.completion_attention_mask.tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]]


# ---------------------------------------------------------------------------------------------------------------------
# Trainer: the grouped update gives the weights of the full-sequence update
# ---------------------------------------------------------------------------------------------------------------------
def _trainer(tmp_path, model_a, model_b, **overrides) -> ILRTrainer:
    torch.manual_seed(0)  # the LoRA initialisation
    agents = [
        AgentConfig(model_name_or_path=model_a, name="a"),
        AgentConfig(model_name_or_path=model_b, name="b", use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0),
    ]
    return ILRTrainer(
        agents, make_args(tmp_path, **overrides), Dataset.from_list(toy_rows()), {"digits": digits_reward}
    )


@pytest.mark.parametrize(
    ("questions", "micro_batch"), [(2, 4), (3, 6)], ids=["whole_groups", "groups_split_across_micro_batches"]
)
def test_update_with_shared_prompts_gives_the_weights_of_the_full_rows(
    questions, micro_batch, tmp_path, tiny_model_a, tiny_model_b, one_thread, monkeypatch
):
    # Q questions x G = 4 per stage; 2 micro-batches per optimizer step, 2 iterations: old and reference log-probs
    # (a reference model for the full agent a, the adapter switched off for the LoRA agent b) go through the same path.
    overrides = {
        "num_generations": 4,
        "generation_batch_size": 4 * questions,
        "per_device_train_batch_size": micro_batch,
        "gradient_accumulation_steps": 2,
        "num_iterations": 2,
        "beta": 0.05,
        "temperature": TEMPERATURE,
        "train_stages": ["share", "analyse", "fuse"],
        "analysis_samples": 4,
        # AdamW's first steps are ~lr * sign(g): with eps 1e-8, entries whose gradient is ~0 up to rounding would take
        # lr-sized steps of either sign. A larger eps keeps the comparison about the gradients.
        "adam_epsilon": 1e-4,
    }
    grouped = _trainer(tmp_path / "grouped", tiny_model_a, tiny_model_b, **overrides)
    full = _trainer(tmp_path / "full", tiny_model_a, tiny_model_b, **overrides)
    full.share_prompt_forward = False

    drawn = grouped.draw_questions()
    transcript = grouped.interact(drawn, grouped.select_modes(drawn, 1), 1)
    rewards = grouped.score(transcript)
    advantages, _ = grouped.compute_advantages(grouped.calibrate(rewards), rewards)

    calls = []
    original = ilr.update.grouped_per_token_logps
    monkeypatch.setattr(ilr.update, "grouped_per_token_logps", lambda *a, **k: calls.append(1) or original(*a, **k))
    for agent_index in (0, 1):
        samples = grouped.build_samples(transcript, agent_index, advantages, 1)
        keys = [(sample.stage, sample.question) for sample in samples]
        runs = [key for row, key in enumerate(keys) if row == 0 or key != keys[row - 1]]
        assert len(runs) == len(set(runs)) == 3 * questions  # each group's samples together
        assert samples == grouped.build_samples(transcript, agent_index, advantages, 1)  # seeded
        before = [p.detach().clone() for p in grouped.models[agent_index].parameters()]
        for p, q in zip(full.models[agent_index].parameters(), before):
            assert torch.equal(p, q)

        calls.clear()
        grouped_metrics = grouped.update_agent(agent_index, samples)
        assert calls  # the shared-prompt path ran...
        calls.clear()
        full_metrics = full.update_agent(agent_index, samples)
        assert not calls  # ...and this one did not

        moved = 0
        for p_grouped, p_full, p_before in zip(
            grouped.models[agent_index].parameters(), full.models[agent_index].parameters(), before
        ):
            torch.testing.assert_close(p_grouped, p_full, rtol=0, atol=1e-6)
            moved += not torch.equal(p_full, p_before)
        assert moved > 0
        assert grouped_metrics.keys() == full_metrics.keys()
        for key in ("loss", "grad_norm", "kl"):
            assert grouped_metrics[key] == pytest.approx(full_metrics[key], rel=1e-4, abs=1e-6), key

"""Tests for `ilr.difficulty`: the 1PL rule, self-rank parsing and z-scoring, ability inversion, the joint fit, the
cache and the pre-passes (with a scripted fake backend: the orchestration is pure logic)."""

import json
import logging
import math

import numpy as np
import pytest

from ilr.difficulty import (
    IRTEstimate,
    abilities_from_accuracy,
    ability_from_accuracy,
    cooperate_fraction,
    fill_missing_ratings,
    fit_1pl,
    irt_probability,
    needs_irt,
    parse_self_rank,
    pass_rate_estimate,
    select_modes,
    self_rank_difficulty,
    self_rank_estimate,
    update_ability,
    zscore_ratings,
)
from ilr.generation import Completion, GenerationOutput, SamplingParams
from ilr.irt import (
    CACHE_KEY_FIELDS,
    irt_cache_key,
    irt_cache_path,
    irt_key_fields,
    load_irt,
    pass_rate_prepass,
    save_irt,
    self_rank_prepass,
)
from ilr.prompts import render


# ---------------------------------------------------------------------------------------------------------------------
# The 1PL model and the interaction rule
# ---------------------------------------------------------------------------------------------------------------------


def test_irt_probability_hand_computed():
    # gamma == D -> 0.5; gamma - D = 1 -> 1 / (1 + e^-1.7); gamma - D = -1 -> 1 / (1 + e^1.7).
    probability = irt_probability(np.array([0.0, 1.0, -1.0]), np.zeros((1, 3)))
    assert probability[0, 0] == 0.5
    assert probability[0, 1] == pytest.approx(1 / (1 + math.exp(-1.7)))
    assert probability[0, 1] == pytest.approx(0.8455, abs=1e-4)
    assert probability[0, 2] == pytest.approx(1 / (1 + math.exp(1.7)))
    # A shared (Q,) difficulty broadcasts to every agent; the scale is honoured.
    shared = irt_probability(np.array([1.0, 2.0]), np.array([0.0, 1.0]), scale=1.0)
    np.testing.assert_allclose(shared, 1 / (1 + np.exp(-np.array([[1.0, 2.0], [0.0, 1.0]]))))


def test_dynamic_rule_hand_computed():
    gamma = np.array([0.0, 1.0, -1.0])
    coop_mask = select_modes(np.zeros((1, 3)), gamma, "dynamic")
    # P = 0.5 -> compete; P = 0.8455 -> compete; P = 0.1545 -> cooperate.
    assert coop_mask.dtype == bool
    assert coop_mask.tolist() == [[False, False, True]]


def test_dynamic_tie_is_exact_for_any_value():
    # gamma == D must compete even where a rounded sigmoid could land a hair under 0.5.
    values = np.array([1e-17, 0.1, 1 / 3, 12345.678])
    coop_mask = select_modes(np.tile(values[:, None], (1, 2)), np.array([1 / 3, 0.1]), "dynamic")
    assert coop_mask[2, 0] == False  # noqa: E712
    assert coop_mask[1, 1] == False  # noqa: E712
    assert coop_mask[3].all() and not coop_mask[0].any()


def test_per_agent_masks_differ_when_abilities_differ():
    difficulty = np.tile(np.array([-1.0, 0.0, 0.5, 2.0])[:, None], (1, 2))
    coop_mask = select_modes(difficulty, np.array([-0.5, 1.0]), "dynamic")
    assert coop_mask[:, 0].tolist() == [False, True, True, True]
    assert coop_mask[:, 1].tolist() == [False, False, False, True]
    # Each agent's own view of the difficulty counts: the same gamma, different D per agent.
    own_view = select_modes(np.array([[0.5, -0.5]]), np.array([0.0, 0.0]), "dynamic")
    assert own_view.tolist() == [[True, False]]
    # A shared (Q,) difficulty is broadcast.
    assert select_modes(difficulty[:, 0], np.array([-0.5, 1.0]), "dynamic").tolist() == coop_mask.tolist()


def test_dynamic_without_gamma_is_an_error():
    with pytest.raises(ValueError, match="gamma"):
        select_modes(np.zeros((2, 2)), None, "dynamic")


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("cooperate", True),
        ("compete", False),
        ("ratio:1", True),
        ("ratio:0", False),
        ("ratio:0.0", False),
        ("ratio:1.0", True),
    ],
)
def test_fixed_modes_are_exact(mode, expected):
    # Gamma and difficulty are ignored; p in {0, 1} needs no rng.
    coop_mask = select_modes(np.full((50, 3), 9.0), None, mode)
    assert coop_mask.shape == (50, 3)
    assert (coop_mask == expected).all()
    assert not needs_irt(mode)


def test_ratio_frequency_is_seeded_and_close_to_p():
    coop_mask = select_modes(np.zeros((5000, 2)), None, "ratio:0.3", rng=np.random.default_rng(7))
    assert abs(cooperate_fraction(coop_mask) - 0.3) < 0.015  # 10,000 draws: std ~0.0046
    again = select_modes(np.zeros((5000, 2)), None, "ratio:0.3", rng=np.random.default_rng(7))
    assert (coop_mask == again).all()
    # Draws are per (question, agent): both agents do not always agree.
    assert (coop_mask[:, 0] != coop_mask[:, 1]).any()
    with pytest.raises(ValueError, match="rng"):
        select_modes(np.zeros((2, 2)), None, "ratio:0.5")


def test_mode_parsing_is_shared_with_configs():
    assert needs_irt("dynamic")
    with pytest.raises(Exception, match="interaction_mode"):
        select_modes(np.zeros((1, 1)), np.zeros(1), "sometimes")


def test_cooperate_fraction():
    assert cooperate_fraction(np.array([[True, False], [True, True]])) == 0.75
    assert math.isnan(cooperate_fraction(np.zeros((0, 2), dtype=bool)))


# ---------------------------------------------------------------------------------------------------------------------
# Self-rank parsing, filling, z-scoring
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Difficulty: 7", 7),
        ("difficulty:7", 7),
        ("Difficulty level: **8**", 8),
        ("7/10", 7),
        ("I'd rate it 7 out of 10.", 7),
        ("**4**", 4),
        ("3", 3),
        ("10.", 10),
        (r"The difficulty is \boxed{6}.", 6),
        ("Rating: 9", 9),
        ("The problem has 3 parts and uses 2 lemmas.\nDifficulty: 5", 5),  # numbers in the text are not ratings
        ("Difficulty: 4\nOn reflection, Difficulty: 6", 6),  # the last rating wins
        ("Difficulty: 3 - it only needs 12 steps", 3),
        ("Difficulty: 12", None),  # out of range
        ("Difficulty: 0", None),
        ("Difficulty: -3", None),
        ("Difficulty: 6.5", 7),  # decimals round half up
        ("Difficulty: 8\nDifficulty: 11", 8),  # last within 1..10
        ("This is a hard problem.", None),
        ("", None),
        (None, None),
        ("The answer is 42", None),
    ],
)
def test_parse_self_rank(text, expected):
    assert parse_self_rank(text) == expected


def test_self_rank_template_renders():
    prompt = render("self_rank", problem=r"What is $\frac{1}{2} + 50\%$ of \$3?")
    assert r"What is $\frac{1}{2} + 50\%$ of \$3?" in prompt
    assert "Difficulty: N" in prompt and "1 to 10" in prompt
    assert parse_self_rank(prompt.replace("Difficulty: N", "Difficulty: 2")) == 2


def test_fill_missing_ratings_uses_each_agents_median(caplog):
    ratings = np.array([[1.0, 9.0], [np.nan, 7.0], [5.0, np.nan], [6.0, np.nan], [np.nan, 2.0]])
    with caplog.at_level(logging.WARNING, logger="ilr.difficulty"):
        filled, medians = fill_missing_ratings(ratings)
    np.testing.assert_array_equal(medians, [5.0, 7.0])
    np.testing.assert_array_equal(filled[:, 0], [1, 5, 5, 6, 5])
    np.testing.assert_array_equal(filled[:, 1], [9, 7, 7, 7, 2])
    assert "2 of 5" in caplog.text
    assert np.isnan(ratings).sum() == 4  # the input is not modified
    # Given medians (the training ones) are used as they are.
    filled_val, _ = fill_missing_ratings(np.array([[np.nan, np.nan]]), medians=medians)
    np.testing.assert_array_equal(filled_val, [[5.0, 7.0]])


def test_fill_missing_all_unparsable_agent(caplog):
    with caplog.at_level(logging.WARNING, logger="ilr.difficulty"):
        filled, _ = fill_missing_ratings(np.array([[np.nan, 3.0], [np.nan, 4.0]]))
    assert np.isfinite(filled).all()
    assert "none of its 2" in caplog.text


def test_zscore_per_agent_and_constant_ratings():
    ratings = np.array([[1.0, 5.0, 2.0], [3.0, 5.0, 4.0], [5.0, 5.0, 9.0]])
    difficulty, mean, std = zscore_ratings(ratings)
    np.testing.assert_allclose(difficulty[:, 0], [-math.sqrt(1.5), 0.0, math.sqrt(1.5)])
    np.testing.assert_array_equal(difficulty[:, 1], [0.0, 0.0, 0.0])  # constant ratings: zeros, no division by zero
    np.testing.assert_allclose(difficulty.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(difficulty[:, 2].std(), 1.0)
    np.testing.assert_allclose(mean, [3.0, 5.0, 5.0])
    assert std[1] == 0.0
    # Another set mapped with the same mean and std lands on the same scale.
    mapped, _, _ = zscore_ratings(np.array([[3.0, 7.0, 5.0]]), mean=mean, std=std)
    np.testing.assert_allclose(mapped, [[0.0, 0.0, 0.0]])


def test_self_rank_difficulty_maps_validation_with_training_stats():
    train = np.array([[2.0, 1.0], [4.0, np.nan], [6.0, 3.0], [np.nan, 5.0]])
    val = np.array([[4.0, np.nan], [8.0, 5.0]])
    train_difficulty, val_difficulty = self_rank_difficulty(train, val)
    # Agent 0: train filled to [2, 4, 6, 4] -> mean 4, std sqrt(2); agent 1: [1, 3, 3, 5] -> mean 3, std sqrt(2).
    np.testing.assert_allclose(train_difficulty[:, 0], np.array([-2, 0, 2, 0]) / math.sqrt(2))
    np.testing.assert_allclose(val_difficulty, np.array([[0, 0], [4, 2]]) / math.sqrt(2))
    assert self_rank_difficulty(train)[1] is None


# ---------------------------------------------------------------------------------------------------------------------
# Ability from accuracy
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("true_gamma", [-2.0, -0.3, 0.0, 0.7, 2.5])
def test_ability_from_accuracy_round_trip(true_gamma):
    difficulties = np.random.default_rng(3).normal(size=1000)
    accuracy = float(irt_probability(np.array([true_gamma]), difficulties).mean())
    assert ability_from_accuracy(accuracy, difficulties) == pytest.approx(true_gamma, abs=1e-6)
    # Another scale, same round trip.
    accuracy = float(irt_probability(np.array([true_gamma]), difficulties, scale=1.0).mean())
    assert ability_from_accuracy(accuracy, difficulties, scale=1.0) == pytest.approx(true_gamma, abs=1e-6)


def test_ability_single_question_is_the_inverse_logistic():
    # One question at D = 0.4: mean P = P, so gamma = D + logit(acc) / 1.7.
    assert ability_from_accuracy(0.8, np.array([0.4])) == pytest.approx(0.4 + math.log(4) / 1.7, abs=1e-9)
    assert ability_from_accuracy(0.5, np.array([0.4])) == pytest.approx(0.4, abs=1e-9)


def test_extreme_accuracies_are_finite_and_ordered():
    difficulties = np.linspace(-2, 2, 101)
    gammas = [ability_from_accuracy(acc, difficulties) for acc in (0.0, 0.01, 0.5, 0.99, 1.0)]
    assert all(math.isfinite(gamma) for gamma in gammas)
    assert gammas == sorted(gammas) and gammas[0] < -2 and gammas[-1] > 2
    assert ability_from_accuracy(0.5, difficulties) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError):
        ability_from_accuracy(1.2, difficulties)
    with pytest.raises(ValueError):
        ability_from_accuracy(0.5, np.array([]))


def test_abilities_and_update_ability():
    difficulty = np.random.default_rng(4).normal(size=(400, 2))
    true_gamma = np.array([-0.4, 0.9])
    accuracy = irt_probability(true_gamma, difficulty).mean(axis=0)
    np.testing.assert_allclose(abilities_from_accuracy(accuracy, difficulty), true_gamma, atol=1e-6)
    # Refresh: an agent without accuracy keeps its gamma; the input array is not modified.
    old_gamma = np.array([0.0, 0.0])
    new_gamma = update_ability(old_gamma, np.array([accuracy[0], np.nan]), difficulty)
    assert new_gamma[0] == pytest.approx(-0.4, abs=1e-6) and new_gamma[1] == 0.0
    assert old_gamma.tolist() == [0.0, 0.0]
    # A shared (n,) difficulty works too.
    shared = update_ability(old_gamma, np.array([0.5, 0.5]), np.zeros(10))
    np.testing.assert_allclose(shared, [0.0, 0.0], atol=1e-9)


# ---------------------------------------------------------------------------------------------------------------------
# Joint 1PL fit
# ---------------------------------------------------------------------------------------------------------------------


def test_fit_1pl_recovers_abilities_and_difficulties():
    rng = np.random.default_rng(0)
    true_gamma = np.array([-0.5, 0.3, 1.0])
    true_difficulty = rng.normal(size=2000)
    k = 8
    correct = rng.binomial(k, irt_probability(true_gamma, true_difficulty))
    assert ((correct == k).all(axis=1)).any() and ((correct == 0).all(axis=1)).any()  # the extremes are present

    gamma, difficulty = fit_1pl(correct, k)

    assert difficulty.shape == (2000,) and gamma.shape == (3,)
    assert abs(difficulty.mean()) < 1e-9 and np.isfinite(difficulty).all()
    # The fit fixes mean(D) = 0: shift the truth to the same origin.
    aligned_gamma = true_gamma - true_difficulty.mean()
    np.testing.assert_allclose(gamma, aligned_gamma, atol=0.1)
    assert np.corrcoef(difficulty, true_difficulty)[0, 1] > 0.9
    # The decisions it drives mostly agree with the truth's.
    true_mask = select_modes(true_difficulty, true_gamma, "dynamic")
    assert (select_modes(difficulty, gamma, "dynamic") == true_mask).mean() > 0.9


def test_fit_1pl_extreme_rows_stay_finite():
    correct = np.array([[4, 4], [0, 0], [2, 3], [1, 2], [4, 4]])
    gamma, difficulty = fit_1pl(correct, 4)
    assert np.isfinite(gamma).all() and np.isfinite(difficulty).all()
    assert difficulty[0] == pytest.approx(difficulty[4])
    assert difficulty[1] > difficulty[3] > difficulty[2] > difficulty[0]  # harder for fewer correct
    assert gamma[1] > gamma[0]
    # A weaker prior pushes the extremes further out but keeps them finite.
    _, loose = fit_1pl(correct, 4, l2=1e-3)
    assert np.isfinite(loose).all() and loose[1] - loose[0] > difficulty[1] - difficulty[0]
    # All answers correct everywhere: finite too.
    gamma_all, difficulty_all = fit_1pl(np.full((6, 2), 3), 3)
    assert np.isfinite(gamma_all).all() and np.allclose(difficulty_all, 0.0)


def test_fit_1pl_rejects_bad_input():
    with pytest.raises(ValueError):
        fit_1pl(np.array([[5, 1]]), 4)
    with pytest.raises(ValueError):
        fit_1pl(np.array([[1, 1]]), 4, l2=0.0)


def test_pass_rate_estimate_is_shared_across_agents():
    correct = np.array([[4, 3], [0, 1], [2, 2]])
    estimate = pass_rate_estimate(["a", "b", "c"], correct, 4, metadata={"k": 4})
    assert estimate.difficulty.shape == (3, 2)
    np.testing.assert_array_equal(estimate.difficulty[:, 0], estimate.difficulty[:, 1])
    assert estimate.source == "pass_rate" and estimate.metadata["k"] == 4
    np.testing.assert_allclose(estimate.metadata["train_accuracy"], [0.5, 0.5])


def test_self_rank_estimate_gamma_matches_validation_accuracy():
    rng = np.random.default_rng(5)
    train = rng.integers(1, 11, size=(200, 2)).astype(float)
    val = rng.integers(1, 11, size=(100, 2)).astype(float)
    estimate = self_rank_estimate([f"q{i}" for i in range(200)], train, val, np.array([0.3, 0.8]))
    _, val_difficulty = self_rank_difficulty(train, val)
    # The gamma reproduces each agent's validation accuracy over its own validation difficulties.
    expected = irt_probability(estimate.gamma, val_difficulty).mean(axis=0)
    np.testing.assert_allclose(expected, [0.3, 0.8], atol=1e-9)
    assert estimate.gamma[1] > estimate.gamma[0]


# ---------------------------------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------------------------------


def _key_fields(**overrides):
    fields = {
        "agents": [("org/model-a", "abc123"), ("org/model-b", None)],
        "dataset": "math",
        "split": "train",
        "source": "self_rank",
        "samples": None,
        "scale": 1.7,
        "seed": 42,
        "dataset_fingerprint": "f00d",
    }
    fields.update(overrides)
    return irt_key_fields(**fields)


def _estimate():
    return IRTEstimate(
        question_ids=["q0", "q1", "q2"],
        difficulty=np.array([[0.5, -1.0], [0.0, 0.25], [-0.5, 0.75]]),
        gamma=np.array([0.1, -0.2]),
        source="self_rank",
        metadata={"note": "test"},
    )


def test_estimate_dict_round_trip_and_lookup():
    estimate = _estimate()
    restored = IRTEstimate.from_dict(json.loads(json.dumps(estimate.to_dict())))
    assert restored.to_dict() == estimate.to_dict()
    np.testing.assert_array_equal(restored.difficulty_for(["q2", "q0"]), [[-0.5, 0.75], [0.5, -1.0]])
    with pytest.raises(KeyError, match="q9"):
        restored.difficulty_for(["q9"])
    with pytest.raises(ValueError, match="rows"):
        IRTEstimate(["a"], np.zeros((2, 2)), np.zeros(2), "self_rank")
    with pytest.raises(ValueError, match="duplicates"):
        IRTEstimate(["a", "a"], np.zeros((2, 2)), np.zeros(2), "self_rank")
    with pytest.raises(ValueError, match="finite"):
        IRTEstimate(["a"], np.array([[np.nan, 0.0]]), np.zeros(2), "self_rank")


def test_cache_round_trip(tmp_path):
    key_fields = _key_fields()
    path = irt_cache_path(tmp_path / "irt", key_fields)
    assert path.parent == tmp_path / "irt" and path.name.startswith("irt_self_rank_") and path.suffix == ".json"
    assert load_irt(path, key_fields) is None  # nothing cached yet
    save_irt(path, _estimate(), key_fields)
    loaded = load_irt(path, key_fields)
    assert loaded is not None
    np.testing.assert_array_equal(loaded.difficulty, _estimate().difficulty)
    np.testing.assert_array_equal(loaded.gamma, _estimate().gamma)
    assert loaded.question_ids == ["q0", "q1", "q2"] and loaded.source == "self_rank"
    assert loaded.metadata["note"] == "test" and loaded.metadata["cache_key"] == irt_cache_key(key_fields)
    assert loaded.metadata["cache_key_fields"]["agents"][0] == {"model": "org/model-a", "revision": "abc123"}
    # The atomic write leaves no temporary file behind; a second save replaces the first.
    save_irt(path, _estimate(), key_fields)
    assert [p.name for p in path.parent.iterdir()] == [path.name]


@pytest.mark.parametrize(
    "change",
    [
        {"agents": [("org/model-a", "def456"), ("org/model-b", None)]},  # another revision
        {"agents": [("org/model-b", None), ("org/model-a", "abc123")]},  # agent order matters
        {"dataset": "gsm8k"},
        {"split": "validation"},
        {"source": "pass_rate", "samples": 4},
        {"scale": 1.0},
        {"seed": 0},
        {"dataset_fingerprint": "beef"},
        {"data_files": ["train.jsonl"]},
    ],
)
def test_cache_key_changes_with_every_field(tmp_path, change):
    key_fields, other = _key_fields(), _key_fields(**change)
    assert irt_cache_key(key_fields) != irt_cache_key(other)
    assert irt_cache_path(tmp_path, key_fields) != irt_cache_path(tmp_path, other)


def test_cache_key_is_order_independent_and_needs_all_fields():
    key_fields = _key_fields()
    assert irt_cache_key(dict(reversed(list(key_fields.items())))) == irt_cache_key(key_fields)
    assert set(CACHE_KEY_FIELDS) <= set(key_fields)
    with pytest.raises(ValueError, match="dataset_fingerprint"):
        irt_cache_key({name: key_fields[name] for name in key_fields if name != "dataset_fingerprint"})


def test_cache_of_other_agents_is_not_reused(tmp_path, caplog):
    # A file for other agents placed under this key's name is refused, not reused.
    key_fields = _key_fields()
    path = irt_cache_path(tmp_path, key_fields)
    save_irt(path, _estimate(), _key_fields(agents=[("org/other", "x"), ("org/model-b", None)]))
    with caplog.at_level(logging.WARNING, logger="ilr.irt"):
        assert load_irt(path, key_fields) is None
    assert "other agents" in caplog.text


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b'{"format_version": 1, "source": "self_rank"',  # truncated
        b"[1, 2, 3]",
        b'{"format_version": 99}',
        b'{"format_version": 1, "source": "self_rank", "question_ids": ["a"], "difficulty": [[1.0, 2.0]], '
        b'"gamma": [0.0]}',  # shape mismatch
        b'{"format_version": 1, "source": "guess", "question_ids": ["a"], "difficulty": [[1.0]], "gamma": [0.0]}',
        b'{"format_version": 1, "source": "self_rank", "question_ids": ["a"], "difficulty": [["x"]], "gamma": [0.0]}',
        b"\xff\xfe\x00garbage",
    ],
)
def test_corrupt_cache_warns_and_returns_none(tmp_path, caplog, content):
    path = tmp_path / "irt.json"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="ilr.irt"):
        assert load_irt(path) is None
    assert "Ignoring unreadable IRT cache" in caplog.text


# ---------------------------------------------------------------------------------------------------------------------
# Pre-passes with a scripted backend
# ---------------------------------------------------------------------------------------------------------------------


class ScriptedBackend:
    """Returns scripted texts (`replies[prompt index][sample index]`) and records every call."""

    def __init__(self, name: str, replies: list[list[str]]):
        self.name = name
        self.replies = replies
        self.calls: list[tuple[list, SamplingParams]] = []

    def generate(self, prompts, params):
        self.calls.append((prompts, params))
        completions = [
            [
                Completion(text=self.replies[row][sample], token_ids=[], logprobs=[], finish_reason="stop")
                for sample in range(params.n)
            ]
            for row in range(len(prompts))
        ]
        return GenerationOutput(prompt_ids=[[] for _ in prompts], completions=completions)


def test_self_rank_prepass_one_call_per_agent(caplog):
    questions = ["What is 1+1?", "Prove Fermat's last theorem.", "Solve $x^2 = 4$."]
    backend_a = ScriptedBackend("a", [["Difficulty: 1"], ["Difficulty: 10"], ["I'd rate it 4/10"]])
    backend_b = ScriptedBackend("b", [["**2**"], ["no idea"], ["Difficulty: 5"]])
    with caplog.at_level(logging.INFO, logger="ilr.irt"):
        ratings = self_rank_prepass(questions, [backend_a, backend_b])
    assert len(backend_a.calls) == 1 and len(backend_b.calls) == 1
    prompts, params = backend_a.calls[0]
    assert len(prompts) == 3 and params.n == 1
    assert prompts[1] == [{"role": "user", "content": render("self_rank", problem=questions[1])}]
    np.testing.assert_array_equal(ratings[:, 0], [1, 10, 4])
    assert ratings[0, 1] == 2 and np.isnan(ratings[1, 1]) and ratings[2, 1] == 5
    assert "b: 2 questions rated, 1 replies unparsable" in caplog.text
    with pytest.raises(ValueError, match="n=1"):
        self_rank_prepass(questions, [backend_a], SamplingParams(n=2))


def test_pass_rate_prepass_counts_correct_answers(caplog):
    questions = ["q0", "q1"]
    golds = ["4", "9"]
    backend_a = ScriptedBackend("a", [["4", "4", "5"], ["9", "bad", "9"]])
    backend_b = ScriptedBackend("b", [["5", "5", "5"], ["9", "9", "9"]])

    def score_fn(completions, gold_answers):
        # Exact match; "bad" cannot be scored (None counts as wrong).
        return [None if text == "bad" else float(text == gold) for text, gold in zip(completions, gold_answers)]

    with caplog.at_level(logging.WARNING, logger="ilr.irt"):
        correct = pass_rate_prepass(
            [[{"role": "user", "content": q}] for q in questions], golds, [backend_a, backend_b], 3, score_fn=score_fn
        )
    assert correct.tolist() == [[2, 0], [2, 3]]
    assert correct.dtype.kind == "i"
    assert len(backend_a.calls) == 1 and len(backend_b.calls) == 1
    assert backend_a.calls[0][1].n == 3
    assert "a: 1 of 6 answers could not be scored" in caplog.text
    with pytest.raises(ValueError, match="golds"):
        pass_rate_prepass(questions, golds[:1], [backend_a], 3, score_fn=score_fn)


def test_pass_rate_prepass_wraps_plain_questions_in_the_single_agent_prompt():
    from ilr.data import build_prompt

    backend = ScriptedBackend("a", [[r"\boxed{2}", r"\boxed{3}"]])
    correct = pass_rate_prepass(["What is 1+1?"], ["2"], [backend], 2, score_fn=lambda texts, golds: [1.0, 0.0])
    assert correct.tolist() == [[1]]
    assert backend.calls[0][0] == [build_prompt({"problem": "What is 1+1?", "task": "math"})]

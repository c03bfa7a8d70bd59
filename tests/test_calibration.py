"""Perception Calibration: hand-computed cases, the NaN policy and the no-op properties of the module docstring."""

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ilr import calibration
from ilr.calibration import advantage_change, advantage_delta, calibrate_rewards, peer_reward_stats
from ilr.grpo import group_advantages


NAN = math.nan


def _advantages_per_agent(rewards: torch.Tensor, scale_rewards: str) -> torch.Tensor:
    """GRPO advantages of each agent's (Q, G) rewards, stacked back to (m, Q, G)."""
    return torch.stack([group_advantages(agent_rewards, scale_rewards) for agent_rewards in rewards])


# ---------------------------------------------------------------------------------------------------------------------
# Hand-computed cases
# ---------------------------------------------------------------------------------------------------------------------
def test_two_agents_group_scope():
    rewards = torch.tensor([[[1.0, 0.0, 1.0, 0.0]], [[1.0, 1.0, 1.0, 0.0]]])
    result = calibrate_rewards(rewards, scope="group")
    # Agent 0 against peer 1 (avg 0.75, range 1): 1 -> 1 + 0.25, 0 -> 0 - 0.75.
    # Agent 1 against peer 0 (avg 0.5, range 1): 1 -> 1 + 0.5, 0 -> 0 - 0.5. Bound 1/(m-1) = 1: nothing clipped.
    expected = torch.tensor([[[1.25, -0.75, 1.25, -0.75]], [[1.5, 1.5, 1.5, -0.5]]])
    torch.testing.assert_close(result.rewards, expected)
    assert result.clip_frac.item() == 0.0
    torch.testing.assert_close(result.clip_frac_per_agent, torch.zeros(2))
    torch.testing.assert_close(result.peer_mean, torch.tensor([[0.5], [0.75]]))
    torch.testing.assert_close(result.peer_max, torch.tensor([[1.0], [1.0]]))
    torch.testing.assert_close(result.peer_min, torch.tensor([[0.0], [0.0]]))


def test_three_agents_group_scope_with_clipping():
    rewards = torch.tensor([[[1.0, 0.0, 0.0, 0.0]], [[1.0, 1.0, 0.0, 0.0]], [[1.0, 1.0, 1.0, 1.0]]])
    result = calibrate_rewards(rewards, scope="group")
    # Bound 1/(m-1) = 0.5. Peer stats: agent 0 avg 0.25 range 1; agent 1 avg 0.5 range 1; agent 2 avg 1 range 0 -> eps.
    # Agent 0, R=1: vs 1 -> +0.5 (exactly the bound: not clipped), vs 2 -> 0/eps = 0       -> 1.5
    #          R=0: vs 1 -> -0.5 (not clipped),                    vs 2 -> -1/eps -> -0.5 -> -1.0  (3 of 8 clipped)
    # Agent 1, R=1: vs 0 -> 0.75 -> 0.5 (clipped), vs 2 -> 0                                -> 1.5
    #          R=0: vs 0 -> -0.25,                 vs 2 -> -1/eps -> -0.5 (clipped)          -> -0.75 (4 of 8 clipped)
    # Agent 2, R=1: vs 0 -> 0.75 -> 0.5 (clipped), vs 1 -> 0.5 (not clipped)                 -> 2.0   (4 of 8 clipped)
    expected = torch.tensor([[[1.5, -1.0, -1.0, -1.0]], [[1.5, 1.5, -0.75, -0.75]], [[2.0, 2.0, 2.0, 2.0]]])
    torch.testing.assert_close(result.rewards, expected)
    torch.testing.assert_close(result.clip_frac_per_agent, torch.tensor([3 / 8, 4 / 8, 4 / 8]))
    torch.testing.assert_close(result.clip_frac, torch.tensor(11 / 24))


def test_batch_scope_differs_from_group_scope():
    # Peer 1 is constant within each question but mixed over the batch.
    rewards = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 1.0], [0.0, 0.0]]])
    group = calibrate_rewards(rewards, scope="group")
    batch = calibrate_rewards(rewards, scope="batch")
    # Group scope, agent 0: q0 peer all 1 (range 0): 1 -> 1 + 0, 0 -> 0 - 1 (clipped); q1 peer all 0: 1 -> 1 + 1
    # (clipped), 0 -> 0 + 0. Agent 1 vs agent 0 (avg 0.5, range 1 on both questions): 1 -> 1.5, 0 -> -0.5.
    torch.testing.assert_close(group.rewards, torch.tensor([[[1.0, -1.0], [2.0, 0.0]], [[1.5, 1.5], [-0.5, -0.5]]]))
    # Batch scope: peer 1 over the batch has avg 0.5, range 1, like peer 0.
    torch.testing.assert_close(batch.rewards, torch.tensor([[[1.5, -0.5], [1.5, -0.5]], [[1.5, 1.5], [-0.5, -0.5]]]))
    torch.testing.assert_close(group.clip_frac_per_agent, torch.tensor([0.5, 0.0]))
    assert batch.clip_frac.item() == 0.0
    torch.testing.assert_close(batch.peer_mean, torch.tensor([[0.5, 0.5], [0.5, 0.5]]))


def test_zero_range_uses_eps_as_denominator():
    rewards = torch.tensor([[[1.0, 0.0]], [[0.5, 0.5]]])
    # Peer 1 has range 0: the denominator is eps. eps = 4: (1 - 0.5) / 4 = 0.125, (0 - 0.5) / 4 = -0.125, unclipped.
    result = calibrate_rewards(rewards, eps=4.0)
    torch.testing.assert_close(result.rewards[0], torch.tensor([[1.125, -0.125]]))
    # Default eps: finite, and the bound is reached.
    result = calibrate_rewards(rewards)
    assert torch.isfinite(result.rewards).all()
    torch.testing.assert_close(result.rewards[0], torch.tensor([[2.0, -1.0]]))
    # A reward equal to the constant peer's value gets a 0 term, not 0/0.
    result = calibrate_rewards(torch.tensor([[[0.5, 0.5]], [[0.5, 0.5]]]))
    torch.testing.assert_close(result.rewards, torch.full((2, 1, 2), 0.5))
    assert result.clip_frac.item() == 0.0


@pytest.mark.parametrize("num_agents", [2, 4])
def test_clip_bound_is_one_over_m_minus_one(num_agents):
    # Agent 0 far above every peer (avg 0.5, range 1): each of the m-1 terms is clipped at +1/(m-1), summing to +1.
    peer_rewards = [[[0.0, 1.0]]] * (num_agents - 1)
    rewards = torch.tensor([[[10.0, -10.0]], *peer_rewards])
    result = calibrate_rewards(rewards)
    torch.testing.assert_close(result.rewards[0], torch.tensor([[11.0, -11.0]]))
    assert result.clip_frac_per_agent[0].item() == 1.0


def test_integer_rewards_and_dtype():
    result = calibrate_rewards(torch.tensor([[[1, 0]], [[1, 1]]]))
    assert result.rewards.dtype == torch.float32
    result = calibrate_rewards(torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]]], dtype=torch.float64))
    assert result.rewards.dtype == torch.float64


def test_input_validation():
    with pytest.raises(ValueError, match="at least 2 agents"):
        calibrate_rewards(torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="shape"):
        calibrate_rewards(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="scope"):
        calibrate_rewards(torch.zeros(2, 2, 4), scope="question")
    with pytest.raises(ValueError, match="eps"):
        calibrate_rewards(torch.zeros(2, 2, 4), eps=0.0)


def test_scopes_match_config():
    configs = pytest.importorskip("ilr.configs")
    assert calibration._SCOPES == configs.CALIBRATION_SCOPES


# ---------------------------------------------------------------------------------------------------------------------
# NaN rewards (cannot score)
# ---------------------------------------------------------------------------------------------------------------------
def test_own_nan_stays_nan():
    rewards = torch.tensor([[[1.0, NAN, 0.0]], [[1.0, 0.0, 0.0]]])
    result = calibrate_rewards(rewards)
    assert math.isnan(result.rewards[0, 0, 1])
    # The other entries: peer 1 avg 1/3, range 1.
    torch.testing.assert_close(result.rewards[0, 0, [0, 2]], torch.tensor([1 + 2 / 3, -1 / 3]))


def test_peer_nan_excluded_from_statistics():
    rewards = torch.tensor([[[1.0, 0.0]], [[1.0, NAN]]])
    result = calibrate_rewards(rewards)
    # Peer 1's statistics come from its single scored reward: avg 1, range 0 -> eps.
    assert result.peer_mean[1, 0].item() == 1.0
    assert result.peer_max[1, 0].item() == 1.0 and result.peer_min[1, 0].item() == 1.0
    torch.testing.assert_close(result.rewards[0], torch.tensor([[1.0, -1.0]]))
    # Agent 1: its scored reward is calibrated against peer 0 (avg 0.5), its NaN stays NaN.
    assert result.rewards[1, 0, 0].item() == 1.5
    assert math.isnan(result.rewards[1, 0, 1])
    # Terms: agent 0 has 2 (1 clipped), agent 1 has 1 (its NaN reward has no term).
    torch.testing.assert_close(result.clip_frac_per_agent, torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(result.clip_frac, torch.tensor(1 / 3))


def test_peer_without_scored_rewards_contributes_zero():
    rewards = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[NAN, NAN], [1.0, 0.0]], [[0.0, 1.0], [1.0, 1.0]]])
    result = calibrate_rewards(rewards, scope="group")
    assert torch.isnan(result.peer_mean[1, 0]) and torch.isnan(result.peer_max[1, 0])
    # Question 0, agent 0: only peer 2 (avg 0.5, range 1) counts: 1 -> 1.5, 0 -> -0.5.
    torch.testing.assert_close(result.rewards[0, 0], torch.tensor([1.5, -0.5]))
    assert torch.isnan(result.rewards[1, 0]).all()
    # Two agents, the peer unscorable: no term at all, rewards unchanged and clip_frac 0 (not NaN).
    lonely = calibrate_rewards(torch.tensor([[[1.0, 0.0]], [[NAN, NAN]]]))
    torch.testing.assert_close(lonely.rewards[0], torch.tensor([[1.0, 0.0]]))
    assert lonely.clip_frac.item() == 0.0
    # Batch scope: a peer with a scored reward anywhere in the batch has statistics for every question.
    batch = calibrate_rewards(rewards, scope="batch")
    torch.testing.assert_close(batch.peer_mean[1], torch.tensor([0.5, 0.5]))


def test_peer_reward_stats_batch_scope_broadcasts():
    rewards = torch.tensor([[[1.0, 0.0], [3.0, NAN]], [[2.0, 2.0], [2.0, 2.0]]])
    mean, max_, min_ = peer_reward_stats(rewards, scope="batch")
    assert mean.shape == max_.shape == min_.shape == (2, 2)
    torch.testing.assert_close(mean[0], torch.tensor([4 / 3, 4 / 3]))
    torch.testing.assert_close(max_[0], torch.tensor([3.0, 3.0]))
    torch.testing.assert_close(min_[0], torch.tensor([0.0, 0.0]))


def test_advantage_delta():
    assert advantage_delta(torch.tensor([1.0, -1.0]), torch.tensor([0.5, -1.0])) == pytest.approx(0.25)
    assert advantage_delta(torch.zeros(0), torch.zeros(0)) == 0.0
    with pytest.raises(ValueError, match="same shape"):
        advantage_delta(torch.zeros(2), torch.zeros(3))


@pytest.mark.parametrize("value", [2.2, 1.1, 0.1, 0.7])
@pytest.mark.parametrize("group_size", [3, 12, 16])
def test_constant_non_dyadic_peer_gives_exactly_zero_terms(value, group_size):
    # The float32 mean of twelve 2.2s is an ulp off 2.2; divided by eps = 1e-6 that ulp was a term of 0.24.
    rewards = torch.full((2, 3, group_size), value, dtype=torch.float32)
    result = calibrate_rewards(rewards, scope="group")
    assert torch.equal(result.rewards, rewards)
    assert result.clip_frac.item() == 0.0
    batch = calibrate_rewards(rewards, scope="batch")
    assert torch.equal(batch.rewards, rewards)
    # A reward that differs from the constant peer's still gets the full clipped term.
    rewards[0, 0, 0] = value + 1.0
    moved = calibrate_rewards(rewards, scope="group").rewards
    assert moved[0, 0, 0].item() == pytest.approx(value + 2.0)
    assert torch.equal(moved[0, 0, 1:], rewards[0, 0, 1:])


def test_advantage_change_tells_a_rescale_from_a_reshape():
    raw = torch.tensor([[[1.0, -1.0, 0.5, -0.5], [0.0, 0.0, 0.0, 0.0]]])
    rescaled = torch.tensor([[[2.0, -2.0, 1.0, -1.0], [0.0, 0.0, 0.0, 0.0]]])  # x 2 in group 0, group 1 constant
    change = advantage_change(rescaled, raw)
    assert change.delta == pytest.approx(0.375) and change.reshaped_frac == 0.0 and change.sign_flip_frac == 0.0
    # Different positive factors per group are still a rescale of each group.
    two_groups = torch.tensor([[[1.0, -1.0], [2.0, -2.0]]])
    assert advantage_change(two_groups * torch.tensor([[[3.0], [0.5]]]), two_groups).reshaped_frac == 0.0
    # One sample's weight changes relative to its group's: reshaped, and its sign flips.
    reshaped = torch.tensor([[[1.0, -1.0, -0.2, -0.5], [0.0, 0.0, 0.0, 0.0]]])
    change = advantage_change(reshaped, raw)
    assert change.reshaped_frac == 1.0  # one group of one with a gradient
    assert change.sign_flip_frac == pytest.approx(1 / 4)  # 4 samples with a gradient, one flipped
    # A negative factor flips every sign: not a rescale.
    assert advantage_change(-raw, raw).reshaped_frac == 1.0
    assert advantage_change(torch.zeros(0, 4), torch.zeros(0, 4)).delta == 0.0


def test_format_reward_under_batch_scaling_is_reshaped_not_rescaled():
    # The case: accuracy + 0.1 x format, peer all correct with mixed format (range 0.1): the format gap is
    # scaled tenfold and clipped, so the agent's correct-but-unformatted answer loses most of its advantage.
    rewards = torch.tensor([[[1.0, 1.1, 0.0, 0.1]], [[1.0, 1.1, 1.1, 1.0]]])
    calibrated = calibrate_rewards(rewards, scope="group").rewards
    change = advantage_change(_advantages_per_agent(calibrated, "batch"), _advantages_per_agent(rewards, "batch"))
    assert change.reshaped_frac > 0
    # and with binary rewards and two agents it is a rescale only (the module docstring's first row)
    binary = torch.tensor([[[1.0, 0.0, 0.0, 1.0]], [[1.0, 1.0, 0.0, 1.0]]])
    binary_calibrated = calibrate_rewards(binary, scope="group").rewards
    for scale in ("group", "batch", "none"):
        change = advantage_change(
            _advantages_per_agent(binary_calibrated, scale), _advantages_per_agent(binary, scale)
        )
        assert change.reshaped_frac == 0.0 and change.sign_flip_frac == 0.0, scale


# ---------------------------------------------------------------------------------------------------------------------
# The no-op properties (module docstring)
# ---------------------------------------------------------------------------------------------------------------------
# No example database: nothing written into the work tree.
PROPERTY_SETTINGS = settings(
    max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
# Invariance holds up to TRL's 1e-4 in the std: relative change < 1e-4 / std, and std >= 0.125 for the rewards drawn
# here (binary, or on a 0.25 grid).
NOOP_RTOL, NOOP_ATOL = 1e-3, 1e-6


@st.composite
def binary_rewards(draw, num_agents: st.SearchStrategy[int], allow_nan: bool = False):
    """Binary (m, Q, G) rewards, optionally with NaN (cannot score) entries."""
    m, num_questions, num_generations = draw(num_agents), draw(st.integers(1, 3)), draw(st.integers(2, 6))
    values = [0.0, 1.0, NAN] if allow_nan else [0.0, 1.0]
    flat = draw(st.lists(st.sampled_from(values), min_size=m * num_questions * num_generations,
                         max_size=m * num_questions * num_generations))  # fmt: skip
    return torch.tensor(flat, dtype=torch.float64).view(m, num_questions, num_generations)


@st.composite
def unclipped_binary_rewards(draw):
    """Binary rewards for which no calibration term is clipped: m = 2 with every group mixed, or m = 3 with every
    group exactly half correct (the only mixed groups whose terms stay within +-1/2)."""
    m = draw(st.sampled_from([2, 3]))
    num_questions, half = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    groups = []
    for _ in range(m * num_questions):
        if m == 2:
            # Any mixed group: one 0 and one 1 guaranteed, the rest free.
            free = draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=2 * half - 2, max_size=2 * half - 2))
            group = [0.0, 1.0, *free]
            group = draw(st.permutations(group))
        else:
            group = draw(st.permutations([0.0] * half + [1.0] * half))
        groups.append(group)
    return torch.tensor(groups, dtype=torch.float64).view(m, num_questions, 2 * half)


@PROPERTY_SETTINGS
@given(rewards=unclipped_binary_rewards(), scope=st.sampled_from(["group", "batch"]))
def test_noop_binary_unclipped_group_scaling(rewards, scope):
    result = calibrate_rewards(rewards, scope=scope)
    assert result.clip_frac.item() == 0.0
    adv_raw = _advantages_per_agent(rewards, "group")
    adv_calibrated = _advantages_per_agent(result.rewards, "group")
    torch.testing.assert_close(adv_calibrated, adv_raw, rtol=NOOP_RTOL, atol=NOOP_ATOL)


@PROPERTY_SETTINGS
@given(rewards=binary_rewards(num_agents=st.integers(2, 4), allow_nan=True), scope=st.sampled_from(["group", "batch"]))
def test_noop_binary_group_scaling_even_with_clipping(rewards, scope):
    # A strictly increasing map of two values is affine: clipping does not break the no-op for 0/1 rewards.
    result = calibrate_rewards(rewards, scope=scope)
    adv_raw = _advantages_per_agent(rewards, "group")
    adv_calibrated = _advantages_per_agent(result.rewards, "group")
    torch.testing.assert_close(adv_calibrated, adv_raw, rtol=NOOP_RTOL, atol=NOOP_ATOL)
    assert advantage_delta(adv_calibrated, adv_raw) < 1e-3


@PROPERTY_SETTINGS
@given(rewards=binary_rewards(num_agents=st.just(2), allow_nan=True))
def test_when_two_agent_binary_terms_clip(rewards):
    # m = 2, group scope: a term is clipped exactly when the peer's scored rewards on the question are all equal and
    # the agent's reward differs from them.
    result = calibrate_rewards(rewards, scope="group")
    expected_clipped = 0
    for agent in range(2):
        peer_rewards = rewards[1 - agent]
        for question in range(rewards.size(1)):
            scored = peer_rewards[question][~torch.isnan(peer_rewards[question])]
            if scored.numel() and (scored == scored[0]).all():
                own = rewards[agent, question]
                expected_clipped += int(((own != scored[0]) & ~torch.isnan(own)).sum())
    num_terms = sum(
        int((~torch.isnan(rewards[agent, question])).sum())
        for agent in range(2)
        for question in range(rewards.size(1))
        if not torch.isnan(rewards[1 - agent, question]).all()
    )
    assert result.clip_frac.item() == pytest.approx(expected_clipped / max(num_terms, 1))


def _rescaling_factors(adv_calibrated: torch.Tensor, adv_raw: torch.Tensor) -> torch.Tensor:
    """Per agent, the factor kappa with A' = kappa * A, asserting that one factor fits the agent's whole batch."""
    factors = []
    for calibrated, raw in zip(adv_calibrated, adv_raw, strict=True):
        kappa = (calibrated * raw).sum() / (raw * raw).sum() if raw.abs().max() > 0 else torch.tensor(1.0)
        torch.testing.assert_close(calibrated, kappa * raw, rtol=NOOP_RTOL, atol=NOOP_ATOL)
        factors.append(kappa)
    return torch.stack(factors)


@PROPERTY_SETTINGS
@given(rewards=binary_rewards(num_agents=st.just(2)), scope=st.sampled_from(["group", "batch"]))
def test_two_agents_binary_is_a_uniform_rescaling(rewards, scope):
    result = calibrate_rewards(rewards, scope=scope)
    # scale_rewards none: the advantages change, exactly by a factor 2 everywhere (f(R) = 2R + c_q).
    adv_raw = _advantages_per_agent(rewards, "none")
    adv_calibrated = _advantages_per_agent(result.rewards, "none")
    torch.testing.assert_close(adv_calibrated, 2 * adv_raw)
    if adv_raw.abs().max() > 0:
        assert advantage_delta(adv_calibrated, adv_raw) > 0
    # scale_rewards batch: the intercepts c_q enter the batch std, but the slope is common: one factor per agent,
    # and 1 with batch scope (one f for the whole batch).
    kappa = _rescaling_factors(_advantages_per_agent(result.rewards, "batch"), _advantages_per_agent(rewards, "batch"))
    assert (kappa > 0).all()
    if scope == "batch":
        torch.testing.assert_close(kappa, torch.ones_like(kappa), rtol=NOOP_RTOL, atol=NOOP_ATOL)


@PROPERTY_SETTINGS
@given(rewards=binary_rewards(num_agents=st.integers(2, 4), allow_nan=True))
def test_batch_scope_binary_noop_under_batch_scaling(rewards):
    # With batch scope one f serves the agent's whole batch, and f is affine on {0, 1}.
    result = calibrate_rewards(rewards, scope="batch")
    adv_raw = _advantages_per_agent(rewards, "batch")
    torch.testing.assert_close(_advantages_per_agent(result.rewards, "batch"), adv_raw, rtol=NOOP_RTOL, atol=NOOP_ATOL)
    _rescaling_factors(_advantages_per_agent(result.rewards, "none"), _advantages_per_agent(rewards, "none"))


@PROPERTY_SETTINGS
@given(
    flat=st.lists(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]), min_size=16, max_size=16),
    scope=st.sampled_from(["group", "batch"]),
)
def test_noop_multi_valued_unclipped_group_scaling(flat, scope):
    rewards = torch.tensor(flat, dtype=torch.float64).view(2, 2, 4)
    result = calibrate_rewards(rewards, scope=scope)
    assume(result.clip_frac.item() == 0.0)
    adv_raw = _advantages_per_agent(rewards, "group")
    adv_calibrated = _advantages_per_agent(result.rewards, "group")
    torch.testing.assert_close(adv_calibrated, adv_raw, rtol=NOOP_RTOL, atol=NOOP_ATOL)
    if scope == "batch":
        adv_raw = _advantages_per_agent(rewards, "batch")
        adv_calibrated = _advantages_per_agent(result.rewards, "batch")
        torch.testing.assert_close(adv_calibrated, adv_raw, rtol=NOOP_RTOL, atol=NOOP_ATOL)


def test_multi_valued_with_clipping_changes_group_scaled_advantages():
    # Accuracy + 0.5 x format: rewards in {0, 0.5, 1.5}. Peer 1 is constant at 1.5 (range 0): its term clips at -1 for
    # every reward below 1.5, so f maps (0, 0.5, 1.5) to (-1, -0.5, 1.5): gaps 0.5 and 2 instead of 0.5 and 1.
    rewards = torch.tensor([[[0.0, 0.5, 1.5, 1.5]], [[1.5, 1.5, 1.5, 1.5]]])
    result = calibrate_rewards(rewards)
    assert result.clip_frac_per_agent[0].item() == 0.5
    torch.testing.assert_close(result.rewards[0], torch.tensor([[-1.0, -0.5, 1.5, 1.5]]))
    delta = advantage_delta(_advantages_per_agent(result.rewards, "group"), _advantages_per_agent(rewards, "group"))
    assert delta > 0.02


def test_three_agents_batch_scaling_changes():
    # m = 3, binary: the slope f(1) - f(0) = 1 + sum_l [min(1 - p_l, 1/2) + min(p_l, 1/2)] depends on the peers'
    # success rates p_l, so it differs between questions and one batch std cannot absorb it. Agent 0: question 0 has
    # peers at p = 1/2 (slope 3), question 1 peers at p = 1/4 (slope 2.5).
    rewards = torch.tensor(
        [
            [[1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]],
            [[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]],
            [[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]],
        ]
    )
    result = calibrate_rewards(rewards, scope="group")
    for scale_rewards in ("batch", "none"):
        adv_raw = _advantages_per_agent(rewards, scale_rewards)
        adv_calibrated = _advantages_per_agent(result.rewards, scale_rewards)
        assert advantage_delta(adv_calibrated, adv_raw) > 0.01, scale_rewards
    # ... while group scaling still leaves them unchanged.
    adv_raw = _advantages_per_agent(rewards, "group")
    torch.testing.assert_close(_advantages_per_agent(result.rewards, "group"), adv_raw, rtol=NOOP_RTOL, atol=NOOP_ATOL)

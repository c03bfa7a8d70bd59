"""Tests for `ilr.rewards`: real math-verify (no mocks), the real worker pool."""

import functools
import hashlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import math_verify
import pytest

from ilr import rewards, worker_pool
from ilr.machine import available_cores
from ilr.rewards import (
    MATH_SCORING,
    REWARD_FUNCS,
    MathScoring,
    accuracy_reward,
    extract_boxed,
    extract_final_boxes,
    format_reward,
    get_reward_funcs,
    score_math,
    shutdown_reward_pool,
)


@pytest.fixture(scope="module", autouse=True)
def _pool():
    yield
    shutdown_reward_pool()


def score_one(pred: str, gold: str, **kwargs) -> float | None:
    return score_math([pred], [gold], **kwargs)[0]


# ---------------------------------------------------------------------------------------------------------------------
# extract_boxed and the numeric-literal rule
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so \boxed{5}", "5"),
        (r"first \boxed{1}, finally \boxed{ 2 }", "2"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces do not count
        (r"\boxed {7}", "7"),
        (r"\fbox{8}", "8"),
        (r"\boxed{\boxed{9}}", "9"),
        (r"\boxed{}", ""),
        (r"\boxed{1} then \boxed{2", None),  # the last box is truncated: not the earlier one
        ("no box here", None),
        (r"\boxedx{3}", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("text", "core"),
    [
        ("6", "6"),
        ("-3", "-3"),
        ("+4", "+4"),
        ("1,000", "1,000"),
        ("1{,}000", "1,000"),
        (r"1\,000", "1000"),
        ("1 000", "1000"),
        ("0.5", "0.5"),
        (".5", ".5"),
        (r"\frac{3}{4}", r"\frac{3}{4}"),
        (r"\dfrac{-1}{2}", r"\dfrac{-1}{2}"),
        (r"-\frac12", r"-\frac12"),
        ("3/4", "3/4"),
        (r"50\%", r"50\%"),
        (r"25\text{\%}", r"25\%"),
        (r"\$18", "18"),
        (r"-\$5", "-5"),
        (r"18 \text{ dollars}", "18"),
        (r"90^\circ", "90"),
        (r"90^{\circ}", "90"),
        ("5°", "5"),
        (r"10 \text{ cm}^2", "10"),
        (r"10 \operatorname{cm}", "10"),
        (r"\text{18}", "18"),
        (r"\mathbf{5}", "5"),
        (r"\cfrac{1}{4}", r"\cfrac{1}{4}"),
        (r"\left( \frac{1}{4} \right)", r"\frac{1}{4}"),
        ("(-7)", "-7"),
        ("35 percent", r"35\%"),
        (r"35 \text{ pct}", r"35\%"),
        ("35 percentage", r"35\%"),
    ],
)
def test_numeric_literals(text, core):
    assert rewards._numeric_core(text) == core


@pytest.mark.parametrize(
    "text",
    [
        "17+21",
        "2^{10}",
        r"\sqrt{2}",
        r"\pi",
        "1.5e3",
        r"2\frac{1}{2}",
        "1,2",
        "1,00",
        "x",
        "",
        r"\frac{1}{x}",
        "(1,2)",
    ],
)
def test_not_numeric_literals(text):
    assert not rewards._is_numeric_literal(text)


# ---------------------------------------------------------------------------------------------------------------------
# score_math: the rules
# ---------------------------------------------------------------------------------------------------------------------


def test_gold_goes_first():
    # math-verify accepts an interval for a relation gold, not a relation for an interval gold: the order matters.
    parse_gold = rewards._parse_gold
    relation, interval = parse_gold(r"x \le 2"), parse_gold(r"(-\infty, 2]")
    assert math_verify.verify(relation, interval, timeout_seconds=None)
    assert not math_verify.verify(interval, relation, timeout_seconds=None)

    assert score_one(r"\boxed{(-\infty, 2]}", r"x \le 2") == 1.0
    assert score_one(r"\boxed{x \le 2}", r"(-\infty, 2]") == 0.0


@pytest.mark.parametrize(
    ("pred", "gold", "expected"),
    [
        # plain-number golds, GSM8K style
        (r"\boxed{6}", "6", 1.0),
        (r"\boxed{7}", "6", 0.0),
        (r"\boxed{1000}", "1,000", 1.0),
        (r"\boxed{1,000}", "1000", 1.0),
        (r"\boxed{1\,000}", "1,000", 1.0),
        (r"\boxed{1,2}", "12", 0.0),
        (r"\boxed{-3}", "-3", 1.0),
        (r"\boxed{\$18}", "18", 1.0),
        (r"\boxed{18 \text{ dollars}}", "18", 1.0),
        (r"\boxed{90^\circ}", "90", 1.0),
        (r"\boxed{5°}", "5", 1.0),
        (r"\boxed{10 \operatorname{cm}}", "10", 1.0),
        (r"\boxed{1 000}", "1000", 1.0),
        (r"\boxed{18}", r"\$18", 1.0),
        # the box is required
        ("The answer is 6.", "6", 0.0),
        ("$6$", "6", 0.0),
        (r"\boxed{}", "6", 0.0),
        # reward hacks: an empty box after the question's arithmetic, or the arithmetic itself boxed
        (r"17 + 21 = \boxed{}", "38", 0.0),
        (r"\boxed{17+21}", "38", 0.0),
        (r"\boxed{38 = 17+21}", "38", 0.0),
        (r"\boxed{38}", "38", 1.0),
        (r"\boxed{17+21=38}", "38", 1.0),  # the value after the last `=` is read
        (r"\boxed{x = 38}", "38", 1.0),
        # fractions and decimals
        (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
        (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
        (r"\boxed{\dfrac{2}{4}}", r"\frac{1}{2}", 0.0),  # not in lowest terms (training; 1.0 in evaluation)
        (r"\boxed{1/2}", r"\frac{1}{2}", 1.0),
        (r"\boxed{2^{-1}}", r"\frac{1}{2}", 0.0),  # an expression for a plain-number gold
        # percentages: the sign is notation, 50% matches 50 and 0.5 (math-verify's semantics)
        (r"\boxed{50\%}", "50", 1.0),
        (r"\boxed{50\%}", "0.5", 1.0),
        (r"\boxed{50}", r"50\%", 1.0),
        (r"\boxed{0.5}", r"50\%", 1.0),
        (r"\boxed{0.5}", "50", 0.0),
        (r"\boxed{0.5\%}", "0.5", 0.0),
        # non-numeric golds keep plain math-verify equivalence
        (r"\boxed{(-\infty,2]}", r"(-\infty, 2]", 1.0),
        (r"\boxed{(-\infty, 2)}", r"(-\infty, 2]", 0.0),
        (r"\boxed{[1, 3)}", "[1, 3)", 1.0),
        (r"\boxed{\sqrt{12}}", r"2\sqrt{3}", 1.0),
        (r"\boxed{2+3x}", "3x+2", 1.0),
        (r"\boxed{3x+3}", "3x+2", 0.0),
        (r"\boxed{\{2,1\}}", r"\{1,2\}", 1.0),
        (r"\boxed{\frac{\pi}{2}}", r"\frac{\pi}{2}", 1.0),
        (r"\boxed{\begin{pmatrix}1\\2\end{pmatrix}}", r"\begin{pmatrix}1\\2\end{pmatrix}", 1.0),
        (r"\boxed{\begin{pmatrix}1\\3\end{pmatrix}}", r"\begin{pmatrix}1\\2\end{pmatrix}", 0.0),
    ],
)
def test_score_math(pred, gold, expected):
    assert score_one(f"Some reasoning. {pred}", gold) == expected


def test_empty_box_hack_is_real():
    # With math-verify's default parsing, the hack above would score 1.0: it is the boxed-only parsing that stops it.
    default = math_verify.parse(r"17 + 21 = \boxed{}", parsing_timeout=None)
    assert math_verify.verify(rewards._parse_gold("38"), default, timeout_seconds=None)


@pytest.mark.parametrize("gold", ["", "abc?!", r"\frac{", None])
@pytest.mark.parametrize("pred", [r"\boxed{5}", r"\boxed{}", "no box"])
def test_unparsable_gold_is_none(gold, pred):
    assert score_one(pred, gold) is None


def test_mismatched_lengths():
    with pytest.raises(ValueError, match="2 completions but 1 golds"):
        score_math(["a", "b"], ["1"])


def test_inline_mode_matches_pool():
    preds = [r"\boxed{6}", r"\boxed{17+21}", r"\boxed{(-\infty,2]}", "none", r"\boxed{50\%}"]
    golds = ["6", "38", r"(-\infty, 2]", "6", "0.5"]
    assert score_math(preds, golds, max_workers=0) == score_math(preds, golds) == [1.0, 0.0, 1.0, 0.0, 1.0]


# ---------------------------------------------------------------------------------------------------------------------
# The two presets: evaluation (math-verify's verdicts) and training (anti-hack rules), on our own cases
# ---------------------------------------------------------------------------------------------------------------------

# (category, completion, gold, evaluation verdict, training verdict). Written for this project, one or more per kind of
# answer that issue 19 found scored differently from math-verify; differences between the columns are the documented
# `MathScoring` settings (README, "Math reward").
PRESET_CASES = [
    # several boxes make one answer set when the gold is a set or a list (`multi_box`)
    ("multi-box", r"The solutions are $\boxed{3}$ and $\boxed{-5}$.", "-5, 3", 1.0, 1.0),
    ("multi-box", r"So $\boxed{(2, 3)}, \boxed{(3, 2)}$", "(3,2),(2,3)", 1.0, 1.0),
    ("multi-box", r"$\boxed{a = 4} \quad \text{and} \quad \boxed{b = 7}$", "a = 4, b = 7", 1.0, 1.0),
    (
        "multi-box",
        r"The discriminant is $\boxed{64}$, so the roots are $\boxed{3}$ and $\boxed{-5}$.",
        "-5, 3",
        1.0,
        1.0,
    ),
    ("multi-box", r"$\boxed{3}, \boxed{-5}, \boxed{7}$", "-5, 3", 0.0, 0.0),  # an extra answer: no credit
    ("multi-box", r"$\boxed{-5}$", "-5, 3", 0.0, 0.0),  # half the set
    ("multi-box", r"$\boxed{3}$ or $\boxed{5}$", "5", 0.0, 1.0),  # a number gold: training reads the last box
    # number forms read as numbers under the plain-number rule (`numeric_gold`)
    ("number form", r"$\boxed{\cfrac{2}{5}}$", r"\frac{2}{5}", 1.0, 1.0),
    ("number form", r"$\boxed{\left( \frac{2}{5} \right)}$", "0.4", 1.0, 1.0),
    ("number form", r"$\boxed{(3)}$", "3", 1.0, 1.0),
    ("number form", r"$\boxed{45 percent}$", r"45\%", 1.0, 1.0),
    ("number form", r"$\boxed{45 \text{ pct}}$", r"45\%", 1.0, 1.0),
    ("number form", r"$\boxed{y \approx 23}$", "23", 1.0, 1.0),
    ("number form", r"$\boxed{0.45 \text{ percent}}$", "0.45", 1.0, 0.0),  # 0.45% is not 0.45
    ("number form", r"$\boxed{2500,75}$", "2500.75", 0.0, 1.0),  # math-verify reads a boxed `a,b` as a pair
    ("number form", r"The answer is 2500,75.", "2500.75", 1.0, 0.0),  # no box
    # intervals with decimals: exact decimals match; a rounded one only at a coarser `float_rounding`
    ("interval", r"$\boxed{(0.4, 1.25]}$", r"(\frac{2}{5}, \frac{5}{4}]", 1.0, 1.0),
    ("interval", r"$\boxed{(0.6667, 2]}$", r"(\frac{2}{3}, 2]", 0.0, 0.0),
    # golds with `\pm` inside a fraction, which math-verify alone reads as `-1` (shared gold reading)
    (
        "plus-minus gold",
        r"$\boxed{y = -1, y = \frac{3 \pm \sqrt{5}}{2}}$",
        r"y = -1, y = \frac{3 \pm \sqrt{5}}{2}",
        1.0,
        1.0,
    ),
    (
        "plus-minus gold",
        r"$\boxed{y = -1, y = \frac{3 \pm \sqrt{7}}{2}}$",
        r"y = -1, y = \frac{3 \pm \sqrt{5}}{2}",
        0.0,
        0.0,
    ),
    (
        "plus-minus gold",
        r"$\boxed{-1, \frac{3+\sqrt5}{2}, \frac{3-\sqrt5}{2}}$",
        r"y = -1, y = \frac{3 \pm \sqrt{5}}{2}",
        1.0,
        1.0,
    ),
    ("plus-minus gold", r"$\boxed{-1, \frac{3+\sqrt5}{2}}$", r"y = -1, y = \frac{3 \pm \sqrt{5}}{2}", 0.0, 0.0),
    # a final answer stated in words after an intermediate box (`answer`)
    ("final answer", r"There are $\boxed{12}$ rows of $110$ seats. The final answer is $1,320$.", "1320", 1.0, 0.0),
    ("final answer", r"There are $\boxed{12}$ rows of $110$ seats. The final answer is $1,320$.", "12", 0.0, 1.0),
    ("final answer", "The answer is 6.", "6", 1.0, 0.0),
    # reward hacks the training rules close (`answer`, `numeric_gold`); evaluation scores what math-verify scores
    ("hack", r"17 + 21 = \boxed{}", "38", 1.0, 0.0),
    ("hack", r"$17 + 21 = \boxed{}$", "38", 0.0, 0.0),
    ("hack", r"$\boxed{17+21}$", "38", 1.0, 0.0),
    ("hack", r"$\boxed{40+5}$", "45", 1.0, 0.0),
    # the question's own unsimplified fraction (issue 12, `fractions`)
    ("unsimplified", r"$\boxed{\frac{84}{144}}$", r"\frac{7}{12}", 1.0, 0.0),
    ("unsimplified", r"$\boxed{\frac{6}{3}}$", "2", 1.0, 0.0),
    ("unsimplified", r"$\boxed{\frac{7}{12}}$", r"\frac{7}{12}", 1.0, 1.0),
    ("unsimplified", r"$\boxed{0.5}$", r"\frac{1}{2}", 1.0, 1.0),
    ("unsimplified", r"$\boxed{\frac{2}{4}}$", r"\frac{2}{4}", 1.0, 1.0),  # the gold is written that way
    # text answers
    ("text", r"$\boxed{\text{Tuesday}}$", r"\text{Tuesday}", 1.0, 1.0),
    ("text", r"$\boxed{\text{Monday}}$", r"\text{Tuesday}", 0.0, 0.0),
]


@pytest.fixture(scope="module")
def preset_scores():
    texts, golds = [case[1] for case in PRESET_CASES], [case[2] for case in PRESET_CASES]
    return score_math(texts, golds, scoring="evaluation"), score_math(texts, golds, scoring="training")


@pytest.mark.parametrize("index", range(len(PRESET_CASES)), ids=[f"{c[0]}-{i}" for i, c in enumerate(PRESET_CASES)])
def test_preset_table(preset_scores, index):
    _, _, _, evaluation, training = PRESET_CASES[index]
    assert (preset_scores[0][index], preset_scores[1][index]) == (evaluation, training)


def test_evaluation_agrees_with_math_verify(preset_scores):
    # The evaluation preset is math-verify itself (default extraction on the whole completion, gold first), except
    # for golds with a `\pm` inside a fraction, which math-verify alone misreads.
    mv_golds = {}
    for (category, text, gold, _, _), score in zip(PRESET_CASES, preset_scores[0]):
        mv_golds.setdefault(gold, math_verify.parse(f"${gold}$", parsing_timeout=None))
        verdict = math_verify.verify(
            mv_golds[gold], math_verify.parse(text, parsing_timeout=None), timeout_seconds=None
        )
        if category != "plus-minus gold":
            assert score == float(verdict), text


def test_scoring_is_the_same_inline():
    texts, golds = [case[1] for case in PRESET_CASES[:8]], [case[2] for case in PRESET_CASES[:8]]
    for scoring in MATH_SCORING:
        assert score_math(texts, golds, scoring=scoring, max_workers=0) == score_math(texts, golds, scoring=scoring)


@pytest.mark.parametrize(
    ("spec", "text", "gold", "expected"),
    [
        ("training,multi_box=last", r"$\boxed{3}$ and $\boxed{-5}$", "-5, 3", 0.0),
        ("training,numeric_gold=equivalent,fractions=any", r"\boxed{17+21}", "38", 1.0),
        ("training,fractions=any", r"\boxed{\frac{84}{144}}", r"\frac{7}{12}", 1.0),
        ("training,float_rounding=3", r"\boxed{(0.6667, 2]}", r"(\frac{2}{3}, 2]", 1.0),
        (MathScoring(text_golds="as_text"), r"\boxed{5}", "abc?!", 0.0),  # compared as text: wrong, not unscorable
    ],
)
def test_each_setting_can_be_changed(spec, text, gold, expected):
    assert score_math([text], [gold], scoring=spec) == [expected]


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("train", "Unknown math scoring preset 'train'"),
        ("training,multi_box", "write `field=value`"),
        ("training,boxes=all", "write `field=value`"),
        ("training,multi_box=first", r"multi_box must be one of \['last', 'answer_set'\]"),
        ("training,float_rounding=x", "float_rounding takes an integer"),
        ("training,answer=math_verify", "plain-number rules read a boxed answer"),
        ("", "preset name"),
    ],
)
def test_bad_scoring_spec(spec, match):
    with pytest.raises(ValueError, match=match):
        MathScoring.from_spec(spec)


def test_presets_differ_only_in_named_settings():
    training, evaluation = MATH_SCORING["training"], MATH_SCORING["evaluation"]
    differing = {key for key, value in training.to_dict().items() if evaluation.to_dict()[key] != value}
    assert differing == {"answer", "numeric_gold", "fractions", "text_golds"}
    assert MathScoring.from_spec("evaluation") == evaluation


@pytest.mark.parametrize(
    ("text", "boxes"),
    [
        (r"$\boxed{1}$ and $\boxed{2}$", ["1", "2"]),
        (r"\boxed{1}, \boxed{2}, or \boxed{3}", ["1", "2", "3"]),
        (r"\boxed{a} \quad \text{and} \quad \boxed{b}", ["a", "b"]),
        (r"\boxed{1} is the first step; the answer is \boxed{2}", ["2"]),
        (r"\boxed{\boxed{9}}", ["9"]),
        (r"\boxed{1} \boxed{2", []),
        ("none", []),
    ],
)
def test_extract_final_boxes(text, boxes):
    assert extract_final_boxes(text) == boxes
    assert extract_boxed(text) == (boxes[-1] if boxes else None)


# ---------------------------------------------------------------------------------------------------------------------
# Reward functions
# ---------------------------------------------------------------------------------------------------------------------


def test_accuracy_reward_conversational():
    completions = [
        [{"role": "assistant", "content": r"It is \boxed{6}."}],
        [{"role": "user", "content": r"\boxed{6}"}, {"role": "assistant", "content": r"\boxed{5}"}],
        [{"role": "assistant", "content": [{"type": "text", "text": r"\boxed{"}, {"type": "text", "text": "6}"}]}],
        [{"role": "user", "content": r"\boxed{6}"}],  # no assistant message: nothing to score
    ]
    assert accuracy_reward(completions, answer=["6"] * 4) == [1.0, 0.0, 1.0, None]
    assert accuracy_reward([r"\boxed{6}", "6"], answer=["6", "6"]) == [1.0, 0.0]


def test_accuracy_reward_skips_other_tasks_and_logs():
    logged = {}
    out = accuracy_reward(
        [r"\boxed{6}", "def f(): pass", r"\boxed{1}"],
        answer=["6", "", "abc?!"],
        task=["math", "code", "math"],
        log_metric=lambda name, value: logged.__setitem__(name, value),
        trainer_state=None,
    )
    assert out == [1.0, None, None]
    assert logged == {"accuracy_reward/unscored": 0.5}  # the bad gold; the code row is not counted


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (r"so \boxed{18}", 1.0),
        (r"\boxed{x^2 + 1}", 1.0),
        (r"\boxed{(-\infty, 2]}", 1.0),
        (r"\boxed{\$1,000}", 1.0),
        (r"\boxed{}", 0.0),
        (r"\boxed{ }", 0.0),
        (r"\boxed{?}", 0.0),
        (r"\boxed{1} or \boxed{2}", 0.0),  # hedging
        (r"\boxed{3", 0.0),
        ("18", 0.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward([completion]) == [expected]
    assert format_reward([[{"role": "assistant", "content": completion}]]) == [expected]


# ---------------------------------------------------------------------------------------------------------------------
# Threads, time bounds, crashes, parallelism
# ---------------------------------------------------------------------------------------------------------------------

THREAD_PREDS = [r"\boxed{6}", r"\boxed{\frac{1}{2}}", r"\boxed{17+21}", r"\boxed{x \le 2}", r"\boxed{\sqrt{12}}"]
THREAD_GOLDS = ["6", "0.5", "38", r"(-\infty, 2]", r"2\sqrt{3}"]


def test_math_verify_needs_the_main_thread():
    # Why the pool exists: math-verify's default signal-based timeouts fail off the main thread.
    with ThreadPoolExecutor(1) as pool, pytest.raises(ValueError, match="thread"):
        pool.submit(math_verify.parse, "$1$", raise_on_error=True).result()


def test_rewards_from_threads():
    expected = accuracy_reward(THREAD_PREDS, answer=THREAD_GOLDS)
    assert expected == [1.0, 1.0, 0.0, 0.0, 1.0]

    results = {}
    thread = threading.Thread(target=lambda: results.update(t=accuracy_reward(THREAD_PREDS, answer=THREAD_GOLDS)))
    thread.start()
    thread.join(timeout=60)
    assert results["t"] == expected

    with ThreadPoolExecutor(4) as pool:  # concurrent callers share the pool, one batch at a time
        futures = [pool.submit(accuracy_reward, THREAD_PREDS, answer=THREAD_GOLDS) for _ in range(4)]
        futures.append(pool.submit(format_reward, THREAD_PREDS))
        assert [f.result(timeout=60) for f in futures[:4]] == [expected] * 4
        assert futures[4].result(timeout=60) == [1.0] * 5


@pytest.mark.timeout(60)
def test_pathological_input_is_time_bounded(caplog):
    huge = "\\boxed{" + "(" * 3000 + "x" + ")" * 3000 + "}"
    preds = [r"\boxed{9^{9^{9^{9}}}}", huge, r"\boxed{2^{100}}"]
    golds = ["2^{100}", "x", "2^{100}"]
    start = time.monotonic()
    with ThreadPoolExecutor(1) as pool, caplog.at_level(logging.WARNING, logger="ilr.rewards"):
        # off the main thread, where math-verify's own timeouts cannot work
        out = pool.submit(score_math, preds, golds, timeout_s=1.0).result(timeout=30)
    assert time.monotonic() - start < 10
    assert out[2] == 1.0
    assert out[0] is None  # timed out: cannot score, not a silent 0
    assert out[1] in (None, 0.0)
    assert "could not be scored (timeout: " in caplog.text
    # A plain-number gold never gets that far: a power is not a numeric literal.
    assert score_one(r"\boxed{9^{9^{9^{9}}}}", "38") == 0.0


@pytest.mark.timeout(60)
def test_worker_stuck_in_c_is_killed():
    # pbkdf2 runs in C without checking signals, so the worker's SIGALRM cannot stop it: the parent kills the worker.
    stall = functools.partial(hashlib.pbkdf2_hmac, "sha256", b"pw", b"salt")
    start = time.monotonic()
    out = worker_pool.run_pool(stall, [1, 10**9, 2, 3], timeout_s=0.3)
    assert time.monotonic() - start < worker_pool.kill_after(0.3) + 8
    assert [status for status, _, _ in out] == ["ok", "timeout", "ok", "ok"]
    assert out[0][1] == hashlib.pbkdf2_hmac("sha256", b"pw", b"salt", 1)
    assert score_one(r"\boxed{6}", "6") == 1.0  # a fresh pool took over


def test_worker_crash_gives_none():
    out = worker_pool.run_pool(os._exit, [3])
    assert out[0][0] == "crash" and out[0][1] is None
    assert score_one(r"\boxed{6}", "6") == 1.0


def test_workers_that_cannot_start_fall_back_inline(monkeypatch, caplog):
    shutdown_reward_pool()
    monkeypatch.setattr(worker_pool, "_init_worker", os.getpid)  # called with arguments: every worker fails to start
    try:
        assert score_math([r"\boxed{6}", r"\boxed{7}"], ["6", "6"]) == [1.0, 0.0]
        assert "fail to start" in caplog.text
        assert worker_pool._pool_unavailable
    finally:
        monkeypatch.undo()
        shutdown_reward_pool()
    assert not worker_pool._pool_unavailable
    assert {pid for _, _, pid in worker_pool.run_pool(abs, [1, 2])} != {os.getpid()}


@pytest.mark.skipif(available_cores() < 2, reason="needs at least 2 cores")
def test_batch_uses_every_core():
    n = 1000
    preds = [f"Step by step... so the answer is \\boxed{{{i if i % 3 else i + 1}}}" for i in range(n)]
    golds = [str(i) for i in range(n)]
    start = time.monotonic()
    details = rewards._score_math_detailed(preds, golds, max_workers=None, timeout_s=5.0)
    elapsed = time.monotonic() - start
    assert [value for _, value, _ in details] == [0.0 if i % 3 == 0 else 1.0 for i in range(n)]
    pids = {pid for _, _, pid in details}
    # Every result came from a worker, and all of them took part (os.cpu_count() on an unrestricted machine).
    assert os.getpid() not in pids
    assert len(pids) == available_cores()
    assert elapsed < 30


# ---------------------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------------------


def test_registry():
    assert get_reward_funcs(["accuracy", "format"]) == [accuracy_reward, format_reward]
    assert get_reward_funcs("format") == [format_reward]
    assert {name: f.__name__ for name, f in REWARD_FUNCS.items()} == {
        "accuracy": "accuracy_reward",
        "format": "format_reward",
        "code": "code_reward",
    }
    with pytest.raises(ValueError, match=r"Unknown reward function 'acc'\. Valid names: accuracy, code, format\. Fix"):
        get_reward_funcs(["accuracy", "acc"])


def test_registry_binds_the_recipe_math_scoring():
    assert get_reward_funcs(["accuracy"], math_scoring="training") == [accuracy_reward]
    (accuracy,) = get_reward_funcs(["accuracy"], math_scoring="training,multi_box=last")
    assert accuracy.__name__ == "accuracy_reward"
    two_boxes = r"$\boxed{3}$ and $\boxed{-5}$"
    assert accuracy([two_boxes], answer=["-5, 3"]) == [0.0]
    assert accuracy_reward([two_boxes], answer=["-5, 3"]) == [1.0]


# ---------------------------------------------------------------------------------------------------------------------
# Code reward: real sandbox, real benchmark rows (local fixture in MBPP's own schema)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mbpp_rows():
    from pathlib import Path

    from ilr.data import load_benchmark

    path = Path(__file__).parent / "fixtures" / "data" / "mbpp.jsonl"
    return load_benchmark("mbpp", data_files=str(path)).select(range(2)).to_list()


def fenced(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\n"


def test_code_reward_scores_the_fraction_of_tests_passed(mbpp_rows, monkeypatch):
    monkeypatch.delenv("ILR_ALLOW_CODE_EXECUTION", raising=False)
    squares, days = mbpp_rows
    (code_fn,) = get_reward_funcs(["code"], allow_code_execution=True)
    assert code_fn.__name__ == "code_reward"
    completions = [
        fenced("def sum_squares(nums):\n    return sum(x * x for x in nums)"),  # right
        fenced("def sum_squares(nums):\n    return 0"),  # passes only `sum_squares([]) == 0`
        "def sum_squares(nums): return 14  # no fenced block",
        fenced("def days_between(a, b):\n    return abs((b - a).days)"),  # needs its setup (`from datetime ...`)
    ]
    rows = [squares, squares, squares, days]
    rewards = code_fn(
        completions,
        tests=[row["tests"] for row in rows],
        setup=[row["setup"] for row in rows],
        task=[row["task"] for row in rows],
    )
    assert rewards == [1.0, pytest.approx(1 / 3), 0.0, 1.0]


def test_code_reward_skips_math_rows_and_problems_without_tests(monkeypatch):
    monkeypatch.setenv("ILR_ALLOW_CODE_EXECUTION", "1")
    completions = [fenced("x = 1"), fenced("x = 1")]
    rewards = REWARD_FUNCS["code"](completions, tests=[["assert x == 1"], []], task=["math", "code"])
    assert rewards == [None, None]


def test_code_reward_refuses_to_run_code_without_the_opt_in(monkeypatch):
    from ilr.sandbox import CodeExecutionDisabledError

    monkeypatch.delenv("ILR_ALLOW_CODE_EXECUTION", raising=False)
    (code_fn,) = get_reward_funcs(["code"])
    with pytest.raises(CodeExecutionDisabledError, match="allow_code_execution"):
        code_fn([fenced("x = 1")], tests=[["assert x == 1"]])

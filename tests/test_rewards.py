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

from ilr import rewards
from ilr.rewards import (
    REWARD_FUNCS,
    accuracy_reward,
    extract_boxed,
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
        (r"\boxed{\dfrac{2}{4}}", r"\frac{1}{2}", 1.0),
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
    out = rewards._run_pool(stall, [1, 10**9, 2, 3], timeout_s=0.3)
    assert time.monotonic() - start < rewards._kill_after(0.3) + 8
    assert [status for status, _, _ in out] == ["ok", "timeout", "ok", "ok"]
    assert out[0][1] == hashlib.pbkdf2_hmac("sha256", b"pw", b"salt", 1)
    assert score_one(r"\boxed{6}", "6") == 1.0  # a fresh pool took over


def test_worker_crash_gives_none():
    out = rewards._run_pool(os._exit, [3])
    assert out[0][0] == "crash" and out[0][1] is None
    assert score_one(r"\boxed{6}", "6") == 1.0


def test_workers_that_cannot_start_fall_back_inline(monkeypatch, caplog):
    shutdown_reward_pool()
    monkeypatch.setattr(rewards, "_init_worker", os.getpid)  # called with two arguments: every worker fails to start
    try:
        assert score_math([r"\boxed{6}", r"\boxed{7}"], ["6", "6"]) == [1.0, 0.0]
        assert "fail to start" in caplog.text
        assert rewards._pool_unavailable
    finally:
        monkeypatch.undo()
        shutdown_reward_pool()
    assert not rewards._pool_unavailable
    assert {pid for _, _, pid in rewards._run_pool(abs, [1, 2])} != {os.getpid()}


@pytest.mark.skipif(rewards._default_workers() < 2, reason="needs at least 2 cores")
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
    assert len(pids) == rewards._default_workers()
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

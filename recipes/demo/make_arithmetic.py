"""Write the CPU demo's arithmetic questions, seeded, in the maths schema: a training file and a held-out test file.

    python recipes/demo/make_arithmetic.py [--num_rows 200] [--num_test_rows 100] [--seed 0]
        [--output recipes/demo/data/arithmetic.jsonl] [--test_output recipes/demo/data/arithmetic_test.jsonl]

Each line is `{"id", "problem", "answer"}`: two- and three-term sums and differences of small numbers, and small
products, phrased as a word problem or a bare expression. The answer is the plain integer (`answer_format: plain`).
Small enough for SmolLM2-135M-Instruct to get some right untrained, so GRPO has a signal from the first step.

The test rows (`arith-test-<i>`, used by `make demo` to evaluate before and after training) are drawn from the same
generator after the training rows, and no expression appears twice across both files: the training file never holds
a test question. Drawing the training rows first keeps `arithmetic.jsonl` identical to the one written before the test
file existed (same seed, same draws).

`arithmetic_hinted.jsonl` (`--hinted_output`) holds the same training rows, every other one followed by an example of
the answer format (`FORMAT_HINT`). It is the training data of the `make demo` recipe: untrained, SmolLM2-135M-Instruct
almost never boxes its answer (about 1 sample in 100 at temperature 1 within 48 tokens, none greedy), so GRPO gets no
reward signal from plain questions; with the example about 1 in 10 samples is boxed. The held-out questions carry no
hint: the demo measures whether the boxed answers carry over to plain questions.
"""

import argparse
import json
import random
from pathlib import Path


def make_rows(num_rows: int, seed: int, num_test_rows: int = 0) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Training rows, then held-out test rows, from one seeded stream with no expression repeated across both."""
    rng = random.Random(seed)
    rows, test_rows, seen = [], [], set()
    while len(rows) + len(test_rows) < num_rows + num_test_rows:
        kind = rng.choice(["add", "add", "sub", "add3", "mul"])
        if kind == "add":
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            expression, answer = f"{a} + {b}", a + b
        elif kind == "sub":
            a, b = sorted((rng.randint(2, 99), rng.randint(2, 99)), reverse=True)
            expression, answer = f"{a} - {b}", a - b
        elif kind == "add3":
            a, b, c = (rng.randint(2, 49) for _ in range(3))
            expression, answer = f"{a} + {b} + {c}", a + b + c
        else:
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            expression, answer = f"{a} \\times {b}", a * b
        if expression in seen:
            continue
        seen.add(expression)
        template = rng.choice(["What is ${e}$?", "Compute ${e}$.", "Calculate ${e}$ and give the result."])
        problem = template.replace("{e}", expression)
        if len(rows) < num_rows:
            rows.append({"id": f"arith-{len(rows)}", "problem": problem, "answer": str(answer)})
        else:
            test_rows.append({"id": f"arith-test-{len(test_rows)}", "problem": problem, "answer": str(answer)})
    return rows, test_rows


FORMAT_HINT = "Answer with just the result in a box, like this: \\boxed{7}."


def add_format_hint(rows: list[dict[str, str]], every: int = 2) -> list[dict[str, str]]:
    """The rows with `FORMAT_HINT` appended to the problem of every `every`-th one (the first included)."""
    return [
        {**row, "problem": f"{row['problem']} {FORMAT_HINT}"} if index % every == 0 else dict(row)
        for index, row in enumerate(rows)
    ]


def write_jsonl(rows: list[dict[str, str]], path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_rows", type=int, default=200)
    parser.add_argument("--num_test_rows", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(Path(__file__).parent / "data" / "arithmetic.jsonl"))
    parser.add_argument("--test_output", default=str(Path(__file__).parent / "data" / "arithmetic_test.jsonl"))
    parser.add_argument("--hinted_output", default=str(Path(__file__).parent / "data" / "arithmetic_hinted.jsonl"))
    options = parser.parse_args()
    rows, test_rows = make_rows(options.num_rows, options.seed, options.num_test_rows)
    write_jsonl(rows, options.output)
    print(f"{len(rows)} questions -> {options.output}")
    write_jsonl(add_format_hint(rows), options.hinted_output)
    print(f"{len(rows)} questions, every other one with a format example -> {options.hinted_output}")
    if test_rows:
        write_jsonl(test_rows, options.test_output)
        print(f"{len(test_rows)} held-out questions -> {options.test_output}")


if __name__ == "__main__":
    main()

"""Write the CPU demo's arithmetic questions: `recipes/demo/data/arithmetic.jsonl`, seeded, in the maths schema.

    python recipes/demo/make_arithmetic.py [--num_rows 200] [--seed 0] [--output recipes/demo/data/arithmetic.jsonl]

Each line is `{"id", "problem", "answer"}`: two- and three-term sums and differences of small numbers, and small
products, phrased as a word problem or a bare expression. The answer is the plain integer (`answer_format: plain`).
Small enough for SmolLM2-135M-Instruct to get some right untrained, so GRPO has a signal from the first step.
"""

import argparse
import json
import random
from pathlib import Path


def make_rows(num_rows: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < num_rows:
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
        rows.append(
            {"id": f"arith-{len(rows)}", "problem": template.replace("{e}", expression), "answer": str(answer)}
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_rows", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(Path(__file__).parent / "data" / "arithmetic.jsonl"))
    options = parser.parse_args()
    rows = make_rows(options.num_rows, options.seed)
    Path(options.output).parent.mkdir(parents=True, exist_ok=True)
    Path(options.output).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    print(f"{len(rows)} questions -> {options.output}")


if __name__ == "__main__":
    main()

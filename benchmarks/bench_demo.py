"""The demo (`recipes/demo/run_demo.py`) on transformers and on vLLM, one after the other, same prompts, steps and threads.

Each backend runs the same demo (evaluation before, ILR training, evaluation after) in its own process, with the same
recipe, seeds, `--threads` and `OMP_NUM_THREADS`. Reported per backend: the whole demo's wall time and its phases,
generated tokens per second and the weight sync of each training step (`metrics.jsonl`: `tokens/per_second`,
`time/sync`), the start of each vLLM engine (logged by the backend), and whether the greedy evaluation before
training gave the same verdict on every question (the two engines on the same weights should agree).

    OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \\
        .venv/bin/python benchmarks/bench_demo.py --quick --threads 1
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


BACKENDS = ("transformers", "vllm")
DEMO_SCRIPT = Path(__file__).resolve().parent.parent / "recipes" / "demo" / "run_demo.py"
# Logged by `VLLMColocateBackend` for each engine it starts.
ENGINE_LOG = re.compile(r"vLLM engine started in ([0-9.]+) s")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="outputs/bench_demo")
    parser.add_argument("--quick", action="store_true", help="the demo's --quick (2 steps, 12 questions)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both demos")
    parser.add_argument("--skip_run", action="store_true", help="only summarise the demos already in output_dir")
    return parser.parse_args(argv)


def run_demo(backend: str, args: argparse.Namespace) -> float:
    """Run one demo in its own process; its wall time in seconds (the log goes to `<output_dir>/<backend>.log`)."""
    folder = Path(args.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(DEMO_SCRIPT), "--threads", str(args.threads), "--generation_backend", backend]
    command += ["--output_dir", str(folder / backend), *(["--quick"] if args.quick else [])]
    start = time.perf_counter()
    with open(folder / f"{backend}.log", "w") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


def summarise(backend: str, folder: Path) -> dict[str, Any]:
    results = json.loads((folder / backend / "results.json").read_text())
    steps = [json.loads(line) for line in (folder / backend / "train" / "metrics.jsonl").read_text().splitlines()]
    # The console keeps to one line per phase; the INFO records (engine starts among them) are in the demo's log file.
    log = (folder / backend / "demo.log").read_text()
    engine = [float(seconds) for seconds in ENGINE_LOG.findall(log)]
    before = {}
    for path in sorted((folder / backend / "before").glob("details_*.jsonl")):
        for record in map(json.loads, path.read_text().splitlines()):
            before[record["id"]] = record["correct"]
    return {
        "timings_s": {key: round(value, 1) for key, value in results["timing"].items()},
        "tokens_per_s_per_step": [round(step["tokens/per_second"], 1) for step in steps],
        "sync_s_per_step": [round(step.get("time/sync", 0.0), 3) for step in steps],
        "step_s": [round(step["time/step"], 1) for step in steps],
        "engine_start_s": engine,
        "before_verdicts": before,
        "machine": results["machine"],
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    folder = Path(args.output_dir)
    if not args.skip_run:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        for backend in BACKENDS:
            print(f"{backend}: {run_demo(backend, args):.0f} s", flush=True)
    summary = {backend: summarise(backend, folder) for backend in BACKENDS}
    a, b = (summary[backend].pop("before_verdicts") for backend in BACKENDS)
    summary["before_verdicts_agree"] = {"same": sum(a[i] == b.get(i) for i in a), "questions": len(a)}
    for backend in BACKENDS:
        row = summary[backend]
        print(
            f"{backend:>12}: demo {row['timings_s']['total_s']:.0f} s (before {row['timings_s']['before_s']:.0f}, "
            f"train {row['timings_s']['train_s']:.0f}, after {row['timings_s']['after_s']:.0f}); "
            f"tokens/s per step median {statistics.median(row['tokens_per_s_per_step']):.0f}; "
            f"sync per step median {statistics.median(row['sync_s_per_step']):.2f} s; "
            f"engine starts {row['engine_start_s']} s"
        )
    agree = summary["before_verdicts_agree"]
    print(f"greedy verdicts before training: {agree['same']} of {agree['questions']} the same on both engines")
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()

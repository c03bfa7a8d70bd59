"""Test helpers: tiny random chat models built offline, a guard against network access, and a process census.

The models are random-weight Llama-architecture causal LMs with their own byte-level BPE tokenizers, trained in code
on a small corpus. Two presets differ in everything an ILR agent pair can differ in: vocabulary, special tokens and
their ids, chat template, BOS handling, hidden size and embedding tying. They build in well under a second each and load
with the plain `AutoModelForCausalLM.from_pretrained(path)` / `AutoTokenizer.from_pretrained(path)`.

A random model rarely samples its EOS. Where a test needs completions that end before the length limit, bias it:
`model.generate(..., sequence_bias=[[[eos_token_id], 2.0]])` makes most 16-token samples stop early.

This module lives in the package (like `transformers.testing_utils` or `accelerate.test_utils`) rather than under
`tests/` so that benchmarks and the offline demo can build the same models. It imports only the standard library at
module level: `tests/conftest.py` imports it for every test run, and torch/transformers are loaded only when a model
is actually built.

The census (`list_processes`, `processes_of_session`, `wait_until_gone`) reads `/proc`, so leak checks find the
processes a run started by its session, ancestry or an environment marker, never by name (Linux; elsewhere it sees
nothing).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path


# ChatML, as used by Qwen: no BOS, every turn closed by `<|im_end|>` (also the EOS).
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Llama-3 style: the template writes the BOS itself, headers wrap the role, every turn ends with `<|eot_id|>`.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class TinyModelSpec:
    """
    Recipe for one tiny random chat model.

    Args:
        name (`str`):
            Short name, used for the output folder.
        vocab_size (`int`):
            Target vocabulary size of the BPE trainer (special tokens included for `specials_first=True`). The final
            vocabulary can be slightly smaller if the corpus runs out of merges; the model always matches it.
        hidden_size (`int`):
            Model width.
        intermediate_size (`int`):
            MLP width.
        num_hidden_layers (`int`):
            Number of decoder layers.
        num_attention_heads (`int`):
            Number of query heads.
        num_key_value_heads (`int`):
            Number of key/value heads (grouped-query attention when smaller than `num_attention_heads`).
        tie_word_embeddings (`bool`):
            Whether the LM head shares the input embedding matrix.
        chat_style (`str`):
            `"chatml"` or `"llama3"`; selects the special tokens and the chat template.
        specials_first (`bool`):
            Whether the special tokens take the first ids or are appended after the learned vocabulary (as in
            Llama 3, whose special ids start at 128000). Code must never assume either layout.
        corpus_seed (`int`):
            Seed that shuffles and samples the training corpus, so that two specs learn different merges.
        seed (`int`):
            Seed for the weight initialisation.
        max_position_embeddings (`int`, *optional*, defaults to `1024`):
            Longest sequence the model (and tokenizer) accept.
    """

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool
    chat_style: str
    specials_first: bool
    corpus_seed: int
    seed: int
    max_position_embeddings: int = 1024


@dataclass(frozen=True)
class TinyModel:
    """
    A built tiny model: where it is and the facts tests usually need about its tokenizer.

    Args:
        path (`str`):
            Folder loadable with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`.
        spec (`TinyModelSpec`):
            The recipe it was built from.
        vocab_size (`int`):
            Size of the tokenizer's vocabulary, special tokens included (equal to the model's `vocab_size`).
        eos_token (`str`):
            End-of-turn token, where generation stops.
        eos_token_id (`int`):
            Its id.
        pad_token (`str`):
            Padding token, distinct from the EOS.
        pad_token_id (`int`):
            Its id.
        bos_token (`str` or `None`):
            Beginning-of-sequence token, or `None` when the tokenizer has none.
        bos_token_id (`int` or `None`):
            Its id.
        generation_prompt (`str`):
            The text `apply_chat_template(..., add_generation_prompt=True)` appends to open the assistant turn.
    """

    path: str
    spec: TinyModelSpec
    vocab_size: int
    eos_token: str
    eos_token_id: int
    pad_token: str
    pad_token_id: int
    bos_token: str | None
    bos_token_id: int | None
    generation_prompt: str


TINY_MODEL_A = TinyModelSpec(
    name="tiny_model_a",
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
    chat_style="chatml",
    specials_first=True,
    corpus_seed=0,
    seed=0,
)

TINY_MODEL_B = TinyModelSpec(
    name="tiny_model_b",
    vocab_size=384,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
    chat_style="llama3",
    specials_first=False,
    corpus_seed=1,
    seed=1,
)

# vLLM's CPU attention refuses head sizes below 32 (A and B have 16 and 12): the same tokenizers and tying with two
# 32-wide heads, for tests that run a real vLLM engine.
TINY_VLLM_MODEL_A = replace(TINY_MODEL_A, name="tiny_vllm_model_a", num_attention_heads=2, num_key_value_heads=1)
TINY_VLLM_MODEL_B = replace(
    TINY_MODEL_B,
    name="tiny_vllm_model_b",
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=2,
    num_key_value_heads=1,
)

_CHAT_STYLES = {
    # specials (in id order), bos, eos, pad, template, generation prompt
    "chatml": (
        ["<pad>", "<|im_start|>", "<|im_end|>"],
        None,
        "<|im_end|>",
        "<pad>",
        CHATML_TEMPLATE,
        "<|im_start|>assistant\n",
    ),
    "llama3": (
        [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|finetune_right_pad_id|>",
        ],
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|finetune_right_pad_id|>",
        LLAMA3_TEMPLATE,
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
}

_WORDS = (
    "Let x be a positive integer such that the sum of its digits is prime . Find the smallest value of x . "
    "Compute the product of all real solutions of the equation . What is the probability that the answer is even ? "
    "The area of the triangle is half the base times the height . Therefore the remainder is 3 . "
    "We solve for y and simplify the fraction . Hence the final answer is 42 . Check each case and count . "
    "I agree with the idea of agent one , but the analysis of step two is wrong . My peer proposed a different "
    "solution ; after discussion we fuse both ideas . Share your reasoning , then analyse the other answers . "
    "system user assistant question answer reasoning think step first second third total number "
)
_LATEX = (
    "\\boxed{42}",
    "\\boxed{\\frac{1}{2}}",
    "\\frac{a}{b}",
    "\\sqrt{2}",
    "x^2 + y^2 = z^2",
    "$3 \\times 4 = 12$",
    "\\left( x + 1 \\right)",
    "\\pi r^2",
    "a \\cdot b",
    "\\le",
    "\\ge",
    "\\neq",
    "\\sum_{i=1}^{n} i",
    "\\dfrac{3}{4}",
    "\\text{cm}",
)
_PYTHON = (
    "def solve(n):\n    return n * (n + 1) // 2\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n",
    "import math\nclass Solution:\n    def run(self, x):\n        while x > 0:\n            x -= 1\n",
    "assert f(3) == 6\nresult = [x for x in data if x is not None]\n",
    "try:\n    value = int(text)\nexcept ValueError:\n    value = None\nelse:\n    pass\n",
    "lambda a, b: a if a > b else b\nwith open(path) as f:\n    lines = f.read()\nyield True and False or None\n",
)


def tiny_corpus(seed: int, num_lines: int = 400) -> list[str]:
    """
    Build a small deterministic training corpus of maths prose, arithmetic, LaTeX and Python.

    Args:
        seed (`int`):
            Seed for the line order and the sampled numbers; different seeds give different merges.
        num_lines (`int`, *optional*, defaults to `400`):
            Number of generated arithmetic/prose lines, on top of the fixed LaTeX and Python snippets.

    Returns:
        `list[str]`: The corpus lines.
    """
    rng = random.Random(seed)
    words = _WORDS.split()
    lines = [_WORDS, *_LATEX, *_PYTHON]
    for _ in range(num_lines):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        op, result = rng.choice([("+", a + b), ("-", a - b), ("\\times", a * b)])
        prose = " ".join(rng.choices(words, k=8))
        lines.append(f"{prose} {a} {op} {b} = \\boxed{{{result}}} {rng.choice(_LATEX)}")
    rng.shuffle(lines)
    return lines


def _build_tokenizer(spec: TinyModelSpec):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials, bos, eos, pad, template, _ = _CHAT_STYLES[spec.chat_style]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    num_learned = spec.vocab_size if spec.specials_first else spec.vocab_size - len(specials)
    trainer = trainers.BpeTrainer(
        vocab_size=num_learned,
        special_tokens=specials if spec.specials_first else [],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(tiny_corpus(spec.corpus_seed), trainer=trainer)
    if not spec.specials_first:
        backend.add_special_tokens(specials)
    if bos is not None:
        # Like Llama 3: a plain `tokenizer(text)` prepends the BOS; chat templates write it themselves.
        bos_id = backend.token_to_id(bos)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        chat_template=template,
        model_max_length=spec.max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )


def build_tiny_model(spec: TinyModelSpec, output_dir: str | Path) -> TinyModel:
    """
    Train the tokenizer, initialise the random model and save both to `output_dir`.

    Deterministic: the same spec always gives the same tokenizer and the same weights. The global torch RNG state is
    left untouched.

    Args:
        spec (`TinyModelSpec`):
            What to build, e.g. [`TINY_MODEL_A`] or [`TINY_MODEL_B`].
        output_dir (`str` or `Path`):
            Folder to save into (created if missing).

    Returns:
        [`TinyModel`]: The saved model's path and tokenizer facts.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    output_dir = Path(output_dir)
    tokenizer = _build_tokenizer(spec)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config)
    # Explicit ids, so that `generate` stops at the end of the turn and pads with the real pad token.
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return TinyModel(
        path=str(output_dir),
        spec=spec,
        vocab_size=len(tokenizer),
        eos_token=tokenizer.eos_token,
        eos_token_id=tokenizer.eos_token_id,
        pad_token=tokenizer.pad_token,
        pad_token_id=tokenizer.pad_token_id,
        bos_token=tokenizer.bos_token,
        bos_token_id=tokenizer.bos_token_id,
        generation_prompt=_CHAT_STYLES[spec.chat_style][5],
    )


def teach_answers(
    model_dir: str | Path,
    output_dir: str | Path,
    prompt_ids: list[list[int]],
    answers: list[str],
    *,
    margin: float = 3.0,
    max_steps: int = 600,
    seed: int = 0,
) -> Path:
    """
    Fine-tune a copy of a tiny model until greedy decoding answers each prompt with its given text, then EOS.

    A random tiny model decodes greedily into the same few tokens whatever the prompt; this one gives prompt-dependent,
    checkable text (e.g. right answers to some questions and wrong ones to others), so that tests can compare engines
    and scores on real completions. Training stops once every answer token is the argmax of its teacher-forced logits
    by at least `margin`, so engines whose fp32 kernels differ in rounding still decode exactly these tokens.

    Args:
        model_dir (`str` or `Path`):
            A saved tiny model with its tokenizer, e.g. [`build_tiny_model`]'s.
        output_dir (`str` or `Path`):
            Where the fine-tuned copy and the tokenizer are saved.
        prompt_ids (`list[list[int]]`):
            Each prompt's token ids, chat template applied, as a generation backend encodes it.
        answers (`list[str]`):
            The completion text of each prompt (the tokenizer's EOS is appended).
        margin (`float`, *optional*, defaults to `3.0`):
            Smallest gap between an answer token's logit and any other token's.
        max_steps (`int`, *optional*, defaults to `600`):
            Optimizer steps before giving up.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the training (the global torch RNG state is left untouched).

    Returns:
        `Path`: `output_dir`.

    Raises:
        `RuntimeError`: when `max_steps` did not reach the margin.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output_dir = Path(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    targets = [tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for text in answers]
    sequences = [prompt + target for prompt, target in zip(prompt_ids, targets)]
    width = max(len(ids) for ids in sequences)
    input_ids = torch.zeros(len(sequences), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    answer_mask = torch.zeros_like(input_ids, dtype=torch.bool)  # positions whose next token is an answer token
    for row, (prompt, ids) in enumerate(zip(prompt_ids, sequences)):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        answer_mask[row, len(prompt) - 1 : len(ids) - 1] = True
    labels = input_ids[:, 1:][answer_mask[:, :-1]]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(max_steps):
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[answer_mask]
            chosen = logits.gather(1, labels[:, None])[:, 0]
            others = logits.scatter(1, labels[:, None], float("-inf")).max(dim=1).values
            if (chosen - others).min() >= margin:
                break
            loss = torch.nn.functional.cross_entropy(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        else:
            raise RuntimeError(f"{max_steps} steps did not teach the answers with a logit margin of {margin}.")
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


class NetworkAccessBlockedError(RuntimeError):
    """Raised by [`block_network`] when code tries to reach a non-loopback address."""


def _is_local_address(address: object) -> bool:
    # Unix sockets, netlink and the like are not network access.
    if not isinstance(address, tuple) or not address or not isinstance(address[0], str):
        return True
    host = address[0].split("%", 1)[0]  # strip an IPv6 zone id ("fe80::1%eth0")
    if host in ("", "localhost") or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # a host name other than localhost: refuse without resolving it
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    # Connecting to 0.0.0.0 / :: reaches this machine.
    return ip.is_loopback or ip.is_unspecified


@contextlib.contextmanager
def block_network() -> Iterator[None]:
    """
    Make every connection to a non-loopback address raise [`NetworkAccessBlockedError`] inside the block.

    Loopback (`127.0.0.0/8`, `::1`, `localhost`) and Unix sockets stay allowed, so local servers can be tested. The
    error is deliberately not an `OSError`: HTTP clients catch those and retry or fall back silently, while a test
    that touches the network should fail at once, naming the address.
    """
    original_connect = socket.socket.connect
    original_connect_ex = socket.socket.connect_ex

    def check(address: object) -> None:
        if not _is_local_address(address):
            raise NetworkAccessBlockedError(
                f"Network access to {address!r} is blocked in tests. Use a local file or a tiny model built with "
                "`ilr.testing.build_tiny_model`, or a server on 127.0.0.1."
            )

    def guarded_connect(self: socket.socket, address: object) -> None:
        check(address)
        return original_connect(self, address)

    def guarded_connect_ex(self: socket.socket, address: object) -> int:
        check(address)
        return original_connect_ex(self, address)

    socket.socket.connect = guarded_connect
    socket.socket.connect_ex = guarded_connect_ex
    try:
        yield
    finally:
        socket.socket.connect = original_connect
        socket.socket.connect_ex = original_connect_ex


# ---------------------------------------------------------------------------------------------------------------------
# Process census: which processes a run left behind
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessInfo:
    """
    One process as `/proc/<pid>/stat` shows it.

    Args:
        pid (`int`), ppid (`int`), session (`int`):
            Its id, its parent's and its session's (the id of the process that started the session).
        state (`str`):
            `"R"`, `"S"`, ... or `"Z"` for a zombie: exited, waiting for its parent to collect its status.
        start_time (`int`):
            When it started, in clock ticks since boot; with the pid, it names the process even after the pid is reused.
        command (`str`):
            Its command line, for error messages.
    """

    pid: int
    ppid: int
    session: int
    state: str
    start_time: int
    command: str


def list_processes(*, zombies: bool = False) -> dict[int, ProcessInfo]:
    """
    Every process of the machine that `/proc` shows, by pid (empty where there is no `/proc`).

    Args:
        zombies (`bool`, *optional*, defaults to `False`):
            Whether to include zombies, which have exited already and only wait to be collected.

    Returns:
        `dict[int, ProcessInfo]`
    """
    try:
        entries = os.listdir("/proc")
    except OSError:
        return {}
    table = {}
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                # The command name (field 2) may hold spaces and parentheses: split after its closing parenthesis.
                fields = f.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError):
            continue  # exited meanwhile
        state = fields[0].decode()
        if state == "Z" and not zombies:
            continue
        table[int(entry)] = ProcessInfo(int(entry), int(fields[1]), int(fields[3]), state, int(fields[19]), command)
    return table


def environment_of(pid: int) -> dict[str, str]:
    """
    The environment process `pid` started with (`/proc/<pid>/environ`; later changes of its own are not shown).

    Args:
        pid (`int`):
            A process id.

    Returns:
        `dict[str, str]`: Empty when it cannot be read (another user's process, or it exited).
    """
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return {}
    pairs = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if item)
    return {name: value for name, _, value in pairs}


def descendants_of(pid: int, table: dict[int, ProcessInfo]) -> set[int]:
    """
    The pids in `table` whose chain of parents leads to `pid` (children, grandchildren, ...).

    Args:
        pid (`int`):
            The ancestor.
        table (`dict[int, ProcessInfo]`):
            A census from `list_processes`.

    Returns:
        `set[int]`
    """
    children: dict[int, list[int]] = {}
    for info in table.values():
        children.setdefault(info.ppid, []).append(info.pid)
    found, frontier = set(), [pid]
    while frontier:
        for child in children.get(frontier.pop(), []):
            if child not in found:
                found.add(child)
                frontier.append(child)
    return found


def processes_of_session(session: int) -> dict[int, ProcessInfo]:
    """
    The live processes of a session: everything a process started with `start_new_session=True` (its pid is the
    session id) ran, except what left the session itself (`setsid`), whether or not their parents are still alive.

    Args:
        session (`int`):
            The session id.

    Returns:
        `dict[int, ProcessInfo]`
    """
    return {pid: info for pid, info in list_processes().items() if info.session == session}


def wait_until_gone(
    find: Callable[[], dict[int, ProcessInfo]], timeout_s: float
) -> tuple[dict[int, ProcessInfo], float]:
    """
    Poll `find` until it returns no process or `timeout_s` has passed.

    Args:
        find (`Callable[[], dict[int, ProcessInfo]]`):
            Returns the processes still alive that should end, e.g. `lambda: processes_of_session(sid)`.
        timeout_s (`float`):
            How long they may take to exit.

    Returns:
        `tuple[dict[int, ProcessInfo], float]`: The processes still alive at the end (empty on success), and the
        seconds waited.
    """
    start = time.monotonic()
    left = find()
    while left and time.monotonic() - start < timeout_s:
        time.sleep(0.01)
        left = find()
    return left, time.monotonic() - start


def describe_processes(processes: dict[int, ProcessInfo]) -> str:
    """One line per process (pid, parent, session, command line), for an assertion message."""
    return "\n".join(
        f"  pid {p.pid} (parent {p.ppid}, session {p.session}): {p.command[:300]}" for p in processes.values()
    )


def assert_session_ends(session: int, timeout_s: float) -> float:
    """
    Assert that every process of a session exits within `timeout_s`: what a run started in a session of its own left
    running once it ended (call it after the run's own process has been waited for).

    Orphans that exited may be zombies of this process (when it is a child subreaper, as `tests/conftest.py` makes
    pytest); they are collected.

    Args:
        session (`int`):
            The session id: the pid of a process started with `start_new_session=True`.
        timeout_s (`float`):
            How long its processes may take to exit.

    Returns:
        `float`: The seconds the last of them took to exit.
    """
    left, seconds = wait_until_gone(lambda: processes_of_session(session), timeout_s)
    assert not left, f"still alive {seconds:.1f} s after the end of session {session}:\n{describe_processes(left)}"
    for pid, info in list_processes(zombies=True).items():
        if info.session == session and info.ppid == os.getpid():
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
    return seconds


def paper_model_configs() -> dict[str, object]:
    """
    Configs of the paper's three models (Llama-3.1-8B-Instruct, Qwen2.5-7B-Instruct, Qwen2.5-14B-Instruct) with their
    published sizes, built in code by their Hub ids: `ilr plan` tests and the README's plan table use them offline.

    Returns:
        `dict[str, PretrainedConfig]`: by Hub id.
    """
    from transformers import LlamaConfig, Qwen2Config

    qwen = {"vocab_size": 152064, "max_position_embeddings": 32768, "tie_word_embeddings": False, "dtype": "bfloat16"}
    return {
        "meta-llama/Llama-3.1-8B-Instruct": LlamaConfig(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=131072,
            tie_word_embeddings=False,
            dtype="bfloat16",
        ),
        "Qwen/Qwen2.5-7B-Instruct": Qwen2Config(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            **qwen,
        ),
        "Qwen/Qwen2.5-14B-Instruct": Qwen2Config(
            hidden_size=5120,
            intermediate_size=13824,
            num_hidden_layers=48,
            num_attention_heads=40,
            num_key_value_heads=8,
            **qwen,
        ),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Ports for the servers a test starts (with `ilr.lifetime.start_child`, so that they never outlive the test run)
# ---------------------------------------------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]

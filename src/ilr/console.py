"""What a person sees while ILR runs, and the log file that keeps the rest.

At the default verbosity the console shows one line of what will run, the progress bars, the warnings that need a
person and the result; every INFO record of `ilr` (and every warning) also goes to a log file in the run's folder.
`--verbose`, or a recipe's `log_level: info`/`debug`, brings the rest back to the console, third-party INFO included.

    from ilr import console

    console.setup(verbose=args.verbose)                  # once, first thing in an entry point
    with console.log_file(Path(output_dir) / "study.log"):
        console.announce(console.describe_run(...))      # the one line of what will run
        ...                                              # logger.warning(...) reaches the console; logger.info(...) the file
        console.announce("Result: ...")

A log call is shown at the default verbosity when it passes `extra=console.SHOW`.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO


__all__ = [
    "NOISE",
    "SHOW",
    "announce",
    "describe_run",
    "format_duration",
    "is_verbose",
    "log_file",
    "result",
    "setup",
    "teardown",
    "write_recipe",
]

logger = logging.getLogger(__name__)

# `logger.info(..., extra=SHOW)`: a record shown on the console at the default verbosity (what runs, the result).
SHOW: dict[str, Any] = {"console": True}
# A record for the log file only: what `result` printed on stdout already.
_FILE_ONLY: dict[str, Any] = {"console": False}

# Third-party messages that tell the user nothing they can act on: hidden from the console unless verbose (the log file
# keeps them). (logger name prefix, start of the message). Errors are never hidden.
NOISE: tuple[tuple[str, str], ...] = (
    # DeepSpeed probes for an accelerator when it is imported (accelerate imports it when installed).
    ("DeepSpeed", "Setting accelerator to CPU"),
    # BPE tokenizers skip the clean-up anyway; transformers says so at every tokenizer's first decode.
    ("transformers", "Ignoring clean_up_tokenization_spaces"),
    # `generate` dumps the whole generation config at INFO, once per model.
    ("transformers", "Generate config"),
)

# Libraries that install their own stderr handler (and, for transformers and DeepSpeed, stop propagation): their records
# are routed through ours instead, so that they reach the log file and follow the console's verbosity.
_LIBRARY_LOGGERS = ("transformers", "datasets", "DeepSpeed")
_FORMAT = "%(asctime)s - %(levelname)s - %(name)s - %(message)s"
_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


class _State:
    def __init__(self, level: int, stream: TextIO):
        self.level = level
        self.console = logging.StreamHandler(stream)
        self.console.addFilter(_ConsoleFilter(self))
        self.console.setFormatter(_ConsoleFormatter(self))
        self.files: list[_LogFile] = []

    @property
    def verbose(self) -> bool:
        return self.level <= logging.INFO


_state: _State | None = None


def _is_noise(record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR:
        return False
    message = str(record.msg)
    return any(
        (record.name == name or record.name.startswith(name + ".")) and message.startswith(start)
        for name, start in NOISE
    )


class _ConsoleFilter(logging.Filter):
    """Quiet: warnings and `SHOW` records, without the third-party noise. Verbose: everything at the level or above."""

    def __init__(self, state: _State):
        super().__init__()
        self.state = state

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "console", None) is False:
            return False
        if self.state.verbose:
            return record.levelno >= self.state.level
        if getattr(record, "console", False):
            return self.state.level <= logging.WARNING
        return record.levelno >= self.state.level and not _is_noise(record)


class _LibraryFilter(logging.Filter):
    """On a library logger with a handler of its own (DeepSpeed's, created at import): drop its noise when quiet."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _state is None or _state.verbose or not _is_noise(record)


class _ConsoleFormatter(logging.Formatter):
    """Quiet: `SHOW` lines as plain text, warnings as `WARNING name: message`. Verbose: time, level and logger."""

    def __init__(self, state: _State):
        super().__init__(_FORMAT, _DATE_FORMAT)
        self.state = state

    def format(self, record: logging.LogRecord) -> str:
        if self.state.verbose:
            return super().format(record)
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        if getattr(record, "console", False) and record.levelno < logging.WARNING:
            return message
        return f"{record.levelname} {record.name}: {message}"


def _level(verbose: bool | str | int | None) -> int:
    """`True`/`"info"`/`"debug"`/a number -> that level; `False`, `None`, `"passive"` -> WARNING (the quiet default)."""
    if verbose is True:
        return logging.INFO
    if not verbose or verbose == "passive":
        return logging.WARNING
    if isinstance(verbose, int):
        return verbose
    level = logging.getLevelName(str(verbose).upper())
    if not isinstance(level, int):
        raise ValueError(f"Unknown log level {verbose!r}: use debug, info, warning, error or critical.")
    return level


def setup(verbose: bool | str | int | None = False, *, stream: TextIO | None = None) -> bool:
    """
    Set up the console (and the buffer that later fills the log file); call it first thing in an entry point.

    Calling it again never makes the console quieter: a verbose entry point stays verbose when the code it calls (e.g.
    `ilr.train.main` with the recipe's `log_level`) sets up the console too.

    Args:
        verbose (`bool`, `str` or `int`, *optional*, defaults to `False`):
            `False` (or `"passive"`, `"warning"`): one line of what runs, progress bars, warnings and the result.
            `True` (or `"info"`, `"debug"`): every record at that level, third-party libraries' included.
            `"error"`/`"critical"`: only those.
        stream (`TextIO`, *optional*, defaults to `sys.stderr`):
            Where the console lines go.

    Returns:
        `bool`: Whether this call set the console up (and so should [`teardown`] it when its entry point ends).
    """
    global _state
    level = _level(verbose)
    created = _state is None
    if not created:
        _state.level = min(_state.level, level)
    else:
        _state = _State(level, stream or sys.stderr)
        root = logging.getLogger()
        root.addHandler(_state.console)
        if root.level == logging.NOTSET or root.level > logging.INFO:
            root.setLevel(logging.INFO)  # INFO records reach the log file; the console filters them
    logging.getLogger("ilr").setLevel(min(logging.INFO, _state.level))
    _route_libraries(_state.level)
    return created


def _route_libraries(level: int) -> None:
    """Send the libraries' records through our handlers, at the console's level (DEBUG/INFO only when verbose)."""
    # Imported here, not lazily later: their own handlers and progress bars are set up when they are first imported.
    import datasets
    from transformers.utils import logging as transformers_logging

    library_level = max(level, logging.WARNING) if level > logging.INFO else level
    for name in _LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        library.setLevel(library_level)
        if not any(isinstance(f, _LibraryFilter) for f in library.filters):
            library.addFilter(_LibraryFilter())
    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
    transformers_logging.set_verbosity(library_level)
    transformers_logging.set_tqdm_hook(_quiet_library_bars)
    datasets.utils.logging.set_verbosity(library_level)
    for handler in list(logging.getLogger("datasets").handlers):
        logging.getLogger("datasets").removeHandler(handler)  # it propagates as well: each record was printed twice
    if level > logging.INFO:
        datasets.disable_progress_bars()  # `Map`, `Generating train split`: a second each, nothing to watch
    else:
        datasets.enable_progress_bars()


def _quiet_library_bars(factory: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
    """transformers' bars, less "Loading weights" when quiet (a fraction of a second, once per model load). Download
    bars stay: a large model takes minutes to arrive."""
    if kwargs.get("desc") == "Loading weights" and not is_verbose():
        kwargs = {**kwargs, "disable": True}
    return factory(*args, **kwargs)


def is_verbose() -> bool:
    """Whether the console shows INFO records (`--verbose`, `log_level: info`)."""
    return _state is not None and _state.verbose


def teardown() -> None:
    """Remove the console and log-file handlers (an entry point called in-process, e.g. by a test, ends with it)."""
    global _state
    if _state is None:
        return
    root = logging.getLogger()
    for handler in [_state.console, *_state.files]:
        root.removeHandler(handler)
        handler.close()
    _state = None


class _LogFile(logging.FileHandler):
    """
    A log file created only once the run announces itself ([`announce`]): the records before that wait in memory, so
    that bad input found while the run is set up (a missing model, data without the benchmark's columns) writes
    nothing into the output folder.
    """

    def __init__(self, path: Path):
        super().__init__(path, mode="a", encoding="utf-8", delay=True)
        self.pending: list[logging.LogRecord] | None = []

    def emit(self, record: logging.LogRecord) -> None:
        if self.pending is not None:
            self.pending.append(record)
        else:
            super().emit(record)

    def start(self) -> None:
        """Create the file (and its folder) and write the records held so far; later records go straight to it."""
        if self.pending is None:
            return
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        pending, self.pending = self.pending, None
        for record in pending:
            super().emit(record)


@contextlib.contextmanager
def log_file(path: str | os.PathLike, *, main_process: bool = True) -> Iterator[Path | None]:
    """
    Write every INFO record of `ilr` and every warning to `path` while the block runs (appended: a resumed run adds to
    the log of the first).

    Args:
        path (`str` or `os.PathLike`):
            The log file, e.g. `<output_dir>/train.log`.
        main_process (`bool`, *optional*, defaults to `True`):
            Only the main process of a distributed run writes it; the others get `None`.

    Yields:
        `pathlib.Path` or `None`: The log file.
    """
    if not main_process:
        yield None
        return
    if _state is None:
        setup()
    path = Path(path)
    handler = _LogFile(path)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter(_FORMAT, _DATE_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    _state.files.append(handler)
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    logger.info("Log of %s started %s (pid %d).", " ".join(sys.argv) or "python", started, os.getpid())
    try:
        yield path
    finally:
        if path.parent.is_dir():  # a run stopped before it announced itself leaves no new folder behind
            handler.start()
        root.removeHandler(handler)
        if handler in _state.files if _state is not None else False:
            _state.files.remove(handler)
        handler.close()


def announce(message: str, *args: Any, source: logging.Logger | None = None) -> None:
    """
    Log `message` (%-style `args`) at INFO and show it on the console at the default verbosity.

    Args:
        message (`str`):
            One line: what will run, an estimate, the result.
        *args:
            Its %-style arguments.
        source (`logging.Logger`, *optional*):
            The logger it is recorded under (defaults to `ilr.console`).
    """
    if _state is not None:
        for handler in _state.files:
            handler.start()  # the run is under way: its log file may now be created
    (source or logger).info(message, *args, extra=SHOW)


def result(text: str) -> None:
    """
    Print a result (a table, a summary) on stdout, where a caller can pipe it, and record it in the log file.

    Args:
        text (`str`):
            The result.
    """
    print(text, flush=True)
    logger.info("%s", text, extra=_FILE_ONLY)


def format_duration(seconds: float) -> str:
    """`42 s`, `3.5 min`, `1.2 h`: a duration for a person."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def describe_run(
    what: str,
    *,
    models: Sequence[str],
    data: str,
    output_dir: str | os.PathLike,
    steps: int | None = None,
    backend: str | None = None,
    device: str | None = None,
    estimate_s: float | None = None,
    extra: str | None = None,
) -> str:
    """
    The one line that says what will run, e.g. `ILR training: 2 agents (a, b), 20 steps, data arithmetic.jsonl,
    transformers on cpu -> outputs/run (log: outputs/run/train.log)`.

    Args:
        what (`str`):
            The kind of run (`"ILR training"`, `"Evaluation"`, `"Study"`).
        models (`Sequence[str]`):
            Model or agent labels.
        data (`str`):
            The data, briefly (a benchmark name, a file).
        output_dir (`str` or `os.PathLike`):
            Where the outputs go.
        steps (`int`, *optional*):
            Training steps.
        backend (`str`, *optional*):
            Generation backend.
        device (`str`, *optional*):
            `cpu`, `cuda`, ... and how many processes.
        estimate_s (`float`, *optional*):
            Expected duration in seconds, once it can be estimated.
        extra (`str`, *optional*):
            Anything else worth one clause (the interaction mode, the number of questions).

    Returns:
        `str`: The line.
    """
    label = "model" if len(models) == 1 else "models"
    parts = [f"{what}: {len(models)} {label} ({', '.join(models)})"]
    if steps is not None:
        parts.append(f"{steps} step{'s' if steps != 1 else ''}")
    parts.append(f"data {data}")
    if extra:
        parts.append(extra)
    if backend or device:
        parts.append(" on ".join(filter(None, (backend, device))))
    line = ", ".join(parts) + f" -> {output_dir}"
    if estimate_s is not None:
        line += f"; about {format_duration(estimate_s)}"
    return line


def write_recipe(
    path: str | os.PathLike, script_args: Any, agents_args: Any, training_args: Any, *, source: str | None = None
) -> Path:
    """
    Write the resolved recipe (every setting, defaults and CLI overrides included) as one flat YAML, credentials
    removed (`ilr.redact.redact_recipe`): it can be passed back with `--config` to run the same settings again.

    Args:
        path (`str` or `os.PathLike`):
            The file, e.g. `<output_dir>/recipe.yaml`.
        script_args, agents_args, training_args:
            The parsed recipe ([`~ilr.configs.parse_recipe`]).
        source (`str`, *optional*):
            The recipe file it was resolved from, named in the header.

    Returns:
        `pathlib.Path`: The written file.
    """
    import dataclasses

    import yaml

    from ilr.files import write_text_atomic
    from ilr.redact import is_credential_key, redact_recipe

    def settings(obj: Any) -> dict[str, Any]:
        # `TrainingArguments.to_dict` writes its nested configs as dicts, which it reads back.
        values = obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj)
        init = {item.name for item in dataclasses.fields(obj) if item.init}
        # An unset credential is left out rather than written as `<removed>`, which would read back as a value.
        return {
            key: _plain(value)
            for key, value in values.items()
            if key in init and (getattr(obj, key) is not None or not is_credential_key(key))
        }

    recipe = {**settings(script_args), **settings(training_args)}
    # Derived from `generation_batch_size` (or the reverse) by GRPOConfig, which refuses both set: keep the batch size.
    recipe.pop("steps_per_generation", None)
    recipe["agents"] = [settings(agent) for agent in agents_args.agents]
    header = [
        "# The resolved recipe of this run: every setting, defaults and command-line overrides included;",
        "# credentials removed. Run the same settings again with `--config <this file>`.",
    ]
    if source:
        header.append(f"# Resolved from {source}.")
    text = "\n".join(header) + "\n" + yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True, width=119)
    path = Path(path)
    write_text_atomic(path, redact_recipe(text))
    return path


def _plain(value: Any) -> Any:
    """A value YAML can write: enums by value, tuples and sets as lists, anything else unknown as its text."""
    import enum

    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)

"""Prompt templates shipped as package data.

Each template is a `<name>.txt` file in this folder, written in `string.Template` syntax: `$field` or `${field}` is a
placeholder and `$$` a literal dollar sign. `string.Template` is used rather than `str.format` because templates and the
texts filled into them are full of LaTeX braces (`\\boxed{}`, `\\frac{1}{2}`); filled-in values are never re-scanned,
so a problem containing `{`, `}` or `$` is inserted verbatim. One trailing newline of the file is dropped.

Templates, by `<task>_<stage>[_<mode>]` with task `math` (answer in `\\boxed{}`) or `code` (one fenced python block):

- `math_single`, `code_single`: the plain single-agent prompt, used at evaluation and as the Idea3 "share" prompt.
- `<task>_analyse_cooperate`, `<task>_analyse_compete`: Idea3 analysis, framed by the agent's mode.
- `<task>_fuse_cooperate`, `<task>_fuse_compete`: Idea3 fusion into a final answer.
- `<task>_debate`: a debate round (the other agents' previous answers, then an updated answer).
- `self_rank`: the difficulty self-rating of Dynamic Interaction (`Difficulty: N`, 1-10).
"""

import string
from functools import cache
from importlib import resources


__all__ = ["available_templates", "load_template", "render"]

_SUFFIX = ".txt"


def available_templates() -> list[str]:
    """
    List the template names shipped with the package.

    Returns:
        `list[str]`: Sorted template names, without the `.txt` suffix.
    """
    root = resources.files(__name__)
    return sorted(p.name[: -len(_SUFFIX)] for p in root.iterdir() if p.name.endswith(_SUFFIX))


@cache
def load_template(name: str) -> str:
    """
    Read a prompt template from the package data.

    Args:
        name (`str`):
            Template name, e.g. `"math_single"` (a trailing `.txt` is accepted).

    Returns:
        `str`: The raw template text, with one trailing newline removed.
    """
    stem = name.removesuffix(_SUFFIX)
    path = resources.files(__name__) / f"{stem}{_SUFFIX}"
    if not stem or "/" in stem or "\\" in stem or not path.is_file():
        raise ValueError(f"Unknown prompt template {name!r}. Available templates: {', '.join(available_templates())}.")
    text = path.read_text(encoding="utf-8")
    return text.removesuffix("\n")


def render(name: str, **fields: object) -> str:
    """
    Fill a template's `$placeholders`.

    Args:
        name (`str`):
            Template name, see [`load_template`].
        **fields:
            Values for the placeholders, converted with `str()`. Extra fields are ignored, so a whole dataset row can
            be passed.

    Returns:
        `str`: The rendered prompt.
    """
    template = string.Template(load_template(name))
    try:
        return template.substitute({k: str(v) for k, v in fields.items()})
    except KeyError as err:
        raise KeyError(f"Template {name!r} needs field {err.args[0]!r}; got {sorted(fields)}.") from None
    except ValueError as err:
        raise ValueError(f"Template {name!r} is malformed (use `$$` for a literal dollar sign): {err}") from None

"""Reward functions for ILR, in the TRL convention.

A reward function is a plain function `(completions, <dataset columns as keyword lists>, **kwargs) -> list[float |
None]`. `completions` is either `list[str]` or TRL's conversational form `list[list[dict]]`, of which the content of
the last assistant message is scored. `None` means "cannot score" (TRL turns it into NaN and skips it); it is never
replaced by a silent 0 or 1.

Maths answers are checked with math-verify, which is slow in the worst case (sympy) and times out through
`signal.alarm`, so only on a main thread. Every math-verify call therefore runs in the time-bounded, crash-safe
process pool of [`ilr.worker_pool`], whatever thread the reward is called from. Work is deduplicated first (GRPO
scores the same boxed answer against the same gold many times); an item that times out or whose worker crashes scores
`None`, counted in a warning. A training script must keep its entry point under `if __name__ == "__main__":` (the
pool's server process imports the main module).

The code reward runs model-written programs through `ilr.sandbox`, one sandbox per completion, concurrently.
"""

import dataclasses
import functools
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

from ilr.worker_pool import run_pool, shutdown_pool


__all__ = [
    "MATH_SCORING",
    "REWARD_FUNCS",
    "MathScoring",
    "accuracy_reward",
    "check_golds",
    "code_reward",
    "extract_boxed",
    "extract_final_boxes",
    "format_reward",
    "get_reward_funcs",
    "score_math",
    "shutdown_reward_pool",
]

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------------
# Scoring rules: one core, two presets (training reward, evaluation)
# ---------------------------------------------------------------------------------------------------------------------

_ANSWER_SOURCES = ("boxed", "math_verify")
_MULTI_BOX = ("last", "answer_set")
_NUMERIC_GOLD = ("plain_number", "equivalent")
_FRACTIONS = ("any", "lowest_terms")
_TEXT_GOLDS = ("unscorable", "as_text")


@dataclass(frozen=True)
class MathScoring:
    r"""
    How `score_math` reads a maths answer and compares it with the gold. Each field is one deliberate difference
    between the two presets of `MATH_SCORING`: `training` (the accuracy reward, which a policy optimises and can
    hack) and `evaluation` (`ilr evaluate`, the demo and cards: math-verify's own verdicts, comparable with lighteval
    and open-r1).

    Args:
        answer (`str`, *optional*, defaults to `"boxed"`):
            Where the answer is read. `boxed`: only the final `\boxed{}` (no box, or an empty one, scores 0), so the
            question's arithmetic written before an empty box (`17 + 21 = \boxed{}`) is never read as the answer.
            `math_verify`: math-verify's default extraction on the whole completion, as lighteval uses it for its
            maths benchmarks (LaTeX and plain expressions, boxed or not, "The final answer is ..." statements).
        multi_box (`str`, *optional*, defaults to `"answer_set"`):
            With `answer="boxed"`, when the gold is a set or list of several answers: `answer_set` reads the final run
            of boxes (separated only by commas, "and"/"or", spacing and math delimiters) as one answer set, so
            `\boxed{-2} \text{ and } \boxed{1}` answers `-2, 1`; `last` reads only the last box.
        numeric_gold (`str`, *optional*, defaults to `"plain_number"`):
            With `answer="boxed"`, when the gold is a plain number: `plain_number` requires the answer to be a number
            too (see `is_numeric_answer`; read after its last `=` or `\approx`), so boxing the question's own
            arithmetic (`\boxed{17+21}` for 38) scores 0; `equivalent` accepts any equivalent expression.
        fractions (`str`, *optional*, defaults to `"any"`):
            With `numeric_gold="plain_number"`: `lowest_terms` scores 0 an integer fraction that is not in lowest terms
            (`\frac{84}{144}` for `\frac{7}{12}`, `\frac{6}{3}` for 2: the question's own fraction, unsimplified),
            unless the gold itself is written that way; `any` accepts every equal value.
        text_golds (`str`, *optional*, defaults to `"unscorable"`):
            A gold math-verify reads only as text (no sympy object): `unscorable` scores `None`; `as_text` compares
            the texts as math-verify does.
        float_rounding (`int`, *optional*, defaults to `6`):
            Decimal places math-verify rounds floats to before comparing (its own default).
    """

    answer: str = "boxed"
    multi_box: str = "answer_set"
    numeric_gold: str = "plain_number"
    fractions: str = "any"
    text_golds: str = "unscorable"
    float_rounding: int = 6

    def __post_init__(self):
        for name, allowed in (
            ("answer", _ANSWER_SOURCES),
            ("multi_box", _MULTI_BOX),
            ("numeric_gold", _NUMERIC_GOLD),
            ("fractions", _FRACTIONS),
            ("text_golds", _TEXT_GOLDS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"MathScoring.{name} must be one of {list(allowed)}, got {getattr(self, name)!r}.")
        if self.answer == "math_verify" and (self.numeric_gold != "equivalent" or self.fractions != "any"):
            raise ValueError(
                "The plain-number rules read a boxed answer: with `answer=math_verify` set `numeric_gold=equivalent` "
                "and `fractions=any` (or use `answer=boxed`)."
            )
        if (
            isinstance(self.float_rounding, bool)
            or not isinstance(self.float_rounding, int)
            or self.float_rounding < 0
        ):
            raise ValueError(f"MathScoring.float_rounding must be an integer >= 0, got {self.float_rounding!r}.")

    @classmethod
    def from_spec(cls, spec: "str | MathScoring") -> "MathScoring":
        """
        Settings from a preset name, optionally followed by overrides: `"training"`, `"evaluation"`,
        `"training,multi_box=last,fractions=any"`. A `MathScoring` is returned as it is.

        Args:
            spec (`str` or `MathScoring`):
                The settings, as a recipe or a command line writes them.

        Returns:
            `MathScoring`

        Raises:
            `ValueError`: For an unknown preset, field or value; the message lists the valid ones.
        """
        if isinstance(spec, MathScoring):
            return spec
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"Math scoring must be a preset name ({', '.join(MATH_SCORING)}), got {spec!r}.")
        preset, *overrides = [part.strip() for part in spec.split(",")]
        if preset not in MATH_SCORING:
            raise ValueError(
                f"Unknown math scoring preset {preset!r}: use one of {', '.join(MATH_SCORING)}, optionally followed "
                "by overrides such as `training,multi_box=last`."
            )
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        changes: dict[str, Any] = {}
        for override in overrides:
            name, sep, value = override.partition("=")
            name, value = name.strip(), value.strip()
            if not sep or name not in fields:
                raise ValueError(
                    f"Bad math scoring override {override!r}: write `field=value`, fields: {list(fields)}."
                )
            if name == "float_rounding":
                if not value.isdigit():
                    raise ValueError(f"Bad math scoring override {override!r}: float_rounding takes an integer.")
                changes[name] = int(value)
            else:
                changes[name] = value
        return dataclasses.replace(MATH_SCORING[preset], **changes)

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain values, as results files record them."""
        return dataclasses.asdict(self)


MATH_SCORING: dict[str, MathScoring] = {
    "training": MathScoring(fractions="lowest_terms"),
    "evaluation": MathScoring(
        answer="math_verify", multi_box="answer_set", numeric_gold="equivalent", fractions="any", text_golds="as_text"
    ),
}


# ---------------------------------------------------------------------------------------------------------------------
# Answer extraction and the numeric-literal rule (pure Python, cheap: run in the calling process)
# ---------------------------------------------------------------------------------------------------------------------

_BOX_OPEN_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
# Any box command, with or without its brace: `\boxed{5}`, `\boxed {5}`, `\boxed 5` (but not `\boxedx`).
_BOX_COMMAND_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])(?:\s*(?P<brace>\{))?")
# A backslash escapes the next character (`\{`, `\}`, and `\\` before a real brace), so only bare braces count.
_BRACE_TOKEN_RE = re.compile(r"\\.|[{}]", re.DOTALL)
# What may stand between the boxes of one answer set: `\boxed{-2}$ and $\boxed{1}`, `\boxed{a} \quad \boxed{b}`.
_BOX_SEPARATOR_RE = re.compile(
    r"(?:\s|[,;&]|\$|\\[()\[\]]|\\\\|\\q?quad(?![A-Za-z])|\\[,;:! ]|~|\b(?:and|or)\b"
    r"|\\(?:text|textrm|mbox)\{\s*(?:,?\s*(?:and|or)|,)?\s*\})*"
)


def _box_at(text: str, command: re.Match) -> tuple[str | None, int]:
    """Content of the box opened by `command` (`None` if never closed) and where it ends."""
    if command.group("brace") is None:
        token = re.match(r"\s+([^\s$]+)", text[command.end() :])
        return (token.group(1), command.end() + token.end()) if token else (None, len(text))
    depth = 1
    for token in _BRACE_TOKEN_RE.finditer(text, command.end()):
        brace = token.group()
        if brace == "{":
            depth += 1
        elif brace == "}":
            depth -= 1
            if depth == 0:
                return text[command.end() : token.start()].strip(), token.end()
    return None, len(text)


def extract_boxed(text: str | None) -> str | None:
    """
    Content of the last `\\boxed{...}` (or `\\fbox{...}`) in a text, read with balanced braces.

    Only the last box command is read: if it is never closed (a truncated completion) the result is `None`, not an
    earlier box, which may hold an intermediate result. In a nested `\\boxed{\\boxed{5}}` the last opening is the inner
    one. `\\boxed 5` (no braces, seen in MATH solutions) yields the next token. Used for model answers and for gold
    solutions alike (`ilr.data`), so both sides agree on what the boxed answer is.

    Args:
        text (`str` or `None`):
            A model completion or a solution.

    Returns:
        `str | None`: The stripped content (`""` for an empty box), or `None` when there is no complete box.
    """
    boxes = extract_final_boxes(text, max_boxes=1)
    return boxes[-1] if boxes else None


def extract_final_boxes(text: str | None, *, max_boxes: int = 16) -> list[str]:
    """
    Contents of the final run of boxes: the last box (as `extract_boxed` reads it) and the boxes just before it that
    are separated from it only by commas, "and"/"or", spacing and math delimiters (`\\boxed{-2}$ and $\\boxed{1}`).

    Args:
        text (`str` or `None`):
            A model completion.
        max_boxes (`int`, *optional*, defaults to `16`):
            At most this many boxes are read, the last ones.

    Returns:
        `list[str]`: The contents in order; empty when there is no complete last box.
    """
    if not isinstance(text, str):
        return []
    commands = list(_BOX_COMMAND_RE.finditer(text))
    if not commands:
        return []
    content, _ = _box_at(text, commands[-1])
    if content is None:
        return []
    boxes, start = [content], commands[-1].start()
    for command in reversed(commands[:-1]):
        if len(boxes) >= max_boxes:
            break
        content, end = _box_at(text, command)
        # A box that encloses the later one (`\boxed{\boxed{5}}`) or stands apart from it ends the run.
        if content is None or end > start or not _BOX_SEPARATOR_RE.fullmatch(text, end, start):
            break
        boxes.insert(0, content)
        start = command.start()
    return boxes


_INT = r"(?:\d{1,3}(?:,\d{3})+|\d+)"  # thousands separators only in groups of three: `1,2` is a pair, not 12
_SIGNED_INT = rf"[+-]?{_INT}"
_FRACTION = rf"\\[dtc]?frac(?:\{{{_SIGNED_INT}\}}\{{{_SIGNED_INT}\}}|\d\d)"  # \frac{3}{4}, \dfrac{-1}{2}, \frac12
_NUMERIC_LITERAL_RE = re.compile(
    rf"[+-]?(?:{_INT}(?:\.\d+)?|\.\d+"  # 18, 1,000, 0.5, .5
    rf"|{_FRACTION}"
    rf"|{_INT}/{_INT})"  # 3/4
)
# A decimal comma, in answers only (`1000,99`, `2,5`): never thousands, which come in groups of three.
_DECIMAL_COMMA_RE = re.compile(r"([+-]?\d+),(\d+)")
_INTEGER_FRACTION_RE = re.compile(r"[+-]?(?:\\[dtc]?frac\{?([+-]?[\d,]+)\}?\{?([+-]?[\d,]+)\}?|([\d,]+)/([\d,]+))")
_SPACING_RE = re.compile(r"\\[,;:! ]|~|\s+")
_WRAPPER_RE = re.compile(r"\\(?:text|textbf|textrm|mathbf|mathrm|boxed)\{(.*)\}")
_PARENS_RE = re.compile(r"\(([^(),]*)\)")
_UNIT_SUFFIX_RE = re.compile(
    r"(?:\\(?:text|textrm|textbf|mathrm|mbox|operatorname)\{[^{}]*\}(?:\^\{?\d\}?)?"  # \text{ cm}, \text{cm}^2
    r"|\\%|%|percent(?:age)?|pct|\^\{?\\circ\}?|°|\\degree)$"
)
_PERCENT_UNIT_RE = re.compile(r"%|percent|pct")
_CURRENCY_PREFIX_RE = re.compile(r"^([+-]?)\\?\$")
_UNESCAPED_DOLLAR_RE = re.compile(r"(?<!\\)\$")
# `1\,000`: a thin space between digits groups thousands; math-verify would read a product.
_DIGIT_SPACING_RE = re.compile(r"(?<=\d)(?:\\[,;:! ]|~)(?=\d)")
# Where a stated value follows: `x = 38`, `17+21=38`, `x \approx 11`.
_VALUE_AFTER_RE = re.compile(r"=|\\approx(?![A-Za-z])")


def _numeric_core(text: str, *, decimal_comma: bool = False) -> str | None:
    """
    The plain number a gold or a boxed answer states, in a canonical form for math-verify; `None` if it is not one.

    A plain number states a value rather than an expression for it. Accepted, after spacing (`\\,`, `~`, blanks),
    `{,}`, `\\left`/`\\right` are dropped and a whole-content `\\text{}`/`\\mathbf{}`/`\\boxed{}` wrapper or pair of
    parentheses is unwrapped: an optional sign, then an integer (thousands separators only in groups of three), a
    decimal, or an integer fraction (`\\frac{a}{b}`, `\\dfrac`, `\\tfrac`, `\\cfrac`, `\\frac12`, `a/b`); with an
    optional leading `\\$` and trailing units (`\\%`, `percent`, `pct`, `^\\circ`, `°`, `\\text{...}`,
    `\\mathrm{...}`), which are dropped, except that a percentage is kept as `\\%`. With `decimal_comma` (answers, not
    golds, where `1,2` lists two answers) a comma that does not group thousands is a decimal point: `1000,99`.
    Not accepted: arithmetic (`17+21`), powers, roots, constants, scientific notation, mixed numbers.
    """
    text = _SPACING_RE.sub("", text).replace("{,}", ",").replace("\\left", "").replace("\\right", "")
    while (match := _WRAPPER_RE.fullmatch(text)) or (match := _PARENS_RE.fullmatch(text)):
        text = match.group(1)
    percent = False
    while match := _UNIT_SUFFIX_RE.search(text):
        percent = percent or _PERCENT_UNIT_RE.search(match.group()) is not None
        text = text[: match.start()]
    text = _CURRENCY_PREFIX_RE.sub(r"\1", text)
    if _NUMERIC_LITERAL_RE.fullmatch(text) is None:
        if not decimal_comma or (match := _DECIMAL_COMMA_RE.fullmatch(text)) is None:
            return None
        text = f"{match.group(1)}.{match.group(2)}"
    return text + "\\%" if percent else text


def _is_numeric_literal(text: str) -> bool:
    return _numeric_core(text) is not None


def _stated_value(content: str) -> str | None:
    """The plain number an answer states, read after its last `=` or `\\approx`; `None` if it states none."""
    return _numeric_core(_VALUE_AFTER_RE.split(content)[-1], decimal_comma=True)


def _in_lowest_terms(number: str) -> bool:
    """Whether a canonical plain number is not an integer fraction that could be reduced (`84/144`, `6/3`)."""
    match = _INTEGER_FRACTION_RE.fullmatch(number.removesuffix("\\%"))
    if match is None:
        return True
    numerator, denominator = (int(g.replace(",", "")) for g in match.groups() if g is not None)
    return abs(denominator) != 1 and math.gcd(numerator, denominator) == 1


def is_numeric_answer(boxed_content: str | None) -> bool:
    """
    Whether a `\\boxed{}` content is a numeric answer as the training reward requires for a numeric gold: a number,
    possibly after `=` or `\\approx` (`38`, `17+21=38`, `x \\approx 11`), not an expression (`17+21`) nor empty.

    Args:
        boxed_content (`str` or `None`):
            The content of the last `\\boxed{}` ([`extract_boxed`]), `None` when there is none.

    Returns:
        `bool`
    """
    return bool(boxed_content) and _stated_value(boxed_content) is not None


def _completion_text(completion: Any) -> str | None:
    """The text to score: a plain string, or the content of the last assistant message of a conversation."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if not isinstance(completion, Sequence) or not completion:
        return None
    messages = [m for m in completion if isinstance(m, dict)]
    assistant = [m for m in messages if m.get("role", "assistant") == "assistant"]
    if not assistant:
        return None
    content = assistant[-1].get("content")
    if isinstance(content, list):  # multimodal parts: [{"type": "text", "text": ...}, ...]
        content = "".join(p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content if isinstance(content, str) else None


def _as_gold(gold: Any) -> str | None:
    if isinstance(gold, bool) or gold is None:
        return None
    if isinstance(gold, int | float):  # a numeric dataset column
        return str(gold) if math.isfinite(gold) else None
    return gold if isinstance(gold, str) else None


# ---------------------------------------------------------------------------------------------------------------------
# Work done inside the pool's workers (math-verify is imported there, never needed by the trainer process)
# ---------------------------------------------------------------------------------------------------------------------


@cache
def _pred_config() -> list:
    from math_verify import LatexExtractionConfig

    # Boxed only: the default configs would also read unanchored text, so `17 + 21 = \boxed{}` parses as `17 + 21`.
    return [LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False)]


def _has_math(parsed: list) -> bool:
    from sympy import Basic, MatrixBase

    # math-verify falls back to the raw string when sympy parsing fails; a string alone is not a parsed answer.
    return any(isinstance(x, Basic | MatrixBase) for x in parsed)


_PLUS_MINUS_RE = re.compile(r"\\(?:pm|mp)(?![A-Za-z])")


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    """`text` split at the `sep`s outside braces, brackets and parentheses."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "{([":
            depth += 1
        elif char in "})]":
            depth -= 1
        elif char == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


_MATH_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\[", "\\]"), ("\\(", "\\)"))


def _split_delimiters(latex: str) -> tuple[str, str, str]:
    """`(opening, body, closing)` of a text wrapped in one pair of math delimiters (`$...$`, `\\[...\\]`)."""
    for opening, closing in _MATH_DELIMITERS:
        if latex.startswith(opening) and latex.endswith(closing) and len(latex) > len(opening) + len(closing):
            return opening, latex[len(opening) : -len(closing)], closing
    return "", latex, ""


def _expand_plus_minus(latex: str) -> str | None:
    """
    `a \\pm b` written out as two answers, `a + b, a - b` (`\\mp` the other way), for each comma-separated part;
    `None` when nothing was written out. latex2sympy cannot read `\\pm` inside a fraction: `\\frac{-1 \\pm
    \\sqrt{13}}{4}`.
    """
    if _PLUS_MINUS_RE.search(latex) is None or "\\boxed" in latex:
        return None
    opening, body, closing = _split_delimiters(latex.strip())
    parts, expanded = [], False
    for part in _split_top_level(body):
        # Inside a set, tuple or interval, two copies of it would be two sets: left as written.
        if _PLUS_MINUS_RE.search(part) is None or part.lstrip().startswith(("\\{", "(", "[", "\\left")):
            parts.append(part)
            continue
        expanded = True
        for plus, minus in (("+", "-"), ("-", "+")):
            parts.append(_PLUS_MINUS_RE.sub(lambda m: plus if m.group() == "\\pm" else minus, part))  # noqa: B023
    return f"{opening}{','.join(parts)}{closing}" if expanded else None


def _parse_with_plus_minus(source: str, parse_one: Callable[[str], list]) -> list:
    """
    `parse_one(source)`, except that a `\\pm` is written out first (`_expand_plus_minus`) when that parses: read as
    written, `y = -1, y = \\frac{3 \\pm \\sqrt{5}}{2}` would parse as `-1` alone.
    """
    parsed = parse_one(source)
    expanded = _expand_plus_minus(source)
    if expanded is not None and _has_math(parsed_expanded := parse_one(expanded)):
        # math-verify's string fallback for the text as written stays, and `verify` compares it as math-verify does.
        return [x for x in parsed_expanded if not isinstance(x, str)] + [x for x in parsed if isinstance(x, str)]
    return parsed


@lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> list:
    from math_verify import parse

    # Default configs (LaTeX + plain expression), on the gold wrapped in `$...$`: bare, `(-\infty, 2]` parses as `2`
    # and `1,2` as `1.2`. Timeouts are ours (`_run_chunk`), math-verify's signal-based ones are off.
    gold = _DIGIT_SPACING_RE.sub("", gold)
    wrapped = "\\boxed" in gold or _UNESCAPED_DOLLAR_RE.search(gold)
    return _parse_with_plus_minus(gold, lambda g: parse(g if wrapped else f"${g}$", parsing_timeout=None))


def _parse_pred(content: str) -> list:
    from math_verify import parse

    content = _DIGIT_SPACING_RE.sub("", content)
    return _parse_with_plus_minus(
        content, lambda c: parse(f"\\boxed{{{c}}}", extraction_config=_pred_config(), parsing_timeout=None)
    )


def _parse_completion(text: str) -> list:
    from math_verify import parse

    # math-verify's defaults, as lighteval's maths tasks read predictions: LaTeX then plain expressions, anchored
    # ("final answer is", "answer:", boxed) before unanchored.
    return parse(text, parsing_timeout=None)


def _parse_gold_as_scored(gold: str) -> list:
    """The gold as the `plain_number` rule reads it: a plain number in its canonical form, anything else as written."""
    gold_number = _numeric_core(gold)
    return _parse_gold(gold if gold_number is None else gold_number)


def _gold_parses(gold: str) -> bool:
    return _has_math(_parse_gold_as_scored(gold))


def _is_answer_set(parsed: list) -> bool:
    from sympy import FiniteSet

    return any(isinstance(x, FiniteSet) and len(x) > 1 for x in parsed)


def _score_pair(scoring: MathScoring, pair: tuple[str, str | tuple[str, ...] | None]) -> float | None:
    """
    Score one `(gold, answer)` pair; see `score_math` and `MathScoring` for the rules. The answer is the completion's
    text with `answer="math_verify"`, the contents of its final boxes with `answer="boxed"` (`None`: no box).
    """
    from math_verify import verify

    gold, answer = pair
    plain_number_rule = scoring.numeric_gold == "plain_number"
    gold_number = _numeric_core(gold) if plain_number_rule else None
    gold_parsed = _parse_gold(gold if gold_number is None else gold_number)
    if not gold_parsed or (scoring.text_golds == "unscorable" and not _has_math(gold_parsed)):
        return None  # unparsable gold: cannot score, never 1.0
    if scoring.answer == "math_verify":
        pred = _parse_completion(answer) if answer else []
    else:
        if not answer or not answer[-1]:
            return 0.0  # no box, or an empty last one
        content = answer[-1]
        if len(answer) > 1 and scoring.multi_box == "answer_set" and _is_answer_set(gold_parsed):
            content = ", ".join(answer)
        if gold_number is not None:
            # `x = 5`, `17+21=38` and `x \approx 11` state their value after the last `=` or `\approx`.
            content = _stated_value(content)
            if content is None:
                return 0.0  # e.g. `\boxed{17+21}`: the question's own arithmetic, not an answer
            if scoring.fractions == "lowest_terms" and _in_lowest_terms(gold_number) and not _in_lowest_terms(content):
                return 0.0  # e.g. `\boxed{\frac{84}{144}}` for 7/12: the question's own fraction, unsimplified
        pred = _parse_pred(content)
    # The gold goes first: verify() is asymmetric (relations vs intervals, assignments).
    correct = verify(gold_parsed, pred, float_rounding=scoring.float_rounding, timeout_seconds=None)
    return 1.0 if pred and correct else 0.0


def _check_parsable(content: str) -> float:
    return 1.0 if _has_math(_parse_pred(content)) else 0.0


class _DropTimeoutDisabledWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


@cache
def _quiet_math_verify() -> None:
    # Inline scoring disables math-verify's timeouts on purpose (the pool bounds time); drop its one warning.
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_DropTimeoutDisabledWarning())


def _init_math_worker() -> None:
    # We disable math-verify's own timeouts on purpose; its warning about that would be repeated by every worker.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    _parse_gold("1")  # load the LaTeX parser before the first timed item


def _run_pool(
    fn: Callable, payloads: list, *, max_workers: int | None = None, timeout_s: float = 5.0
) -> list[tuple[str, Any, int | None]]:
    """[`~ilr.worker_pool.run_pool`] with math-verify's set-up in the workers and inline."""
    return run_pool(
        fn,
        payloads,
        max_workers=max_workers,
        timeout_s=timeout_s,
        worker_init=_init_math_worker,
        inline_init=_quiet_math_verify,
    )


def shutdown_reward_pool() -> None:
    """
    Stop the reward worker processes. The next scoring call starts a new pool; also run at interpreter exit.
    """
    shutdown_pool()


def _warn_unscored(name: str, outcomes: list[tuple[str, Any, int | None]]) -> None:
    counts = Counter(status for status, _, _ in outcomes if status != "ok")
    if counts:
        detail = ", ".join(f"{status}: {n}" for status, n in sorted(counts.items()))
        logger.warning(
            "%s: %d of %d distinct items could not be scored (%s).", name, counts.total(), len(outcomes), detail
        )
        errors = [value for status, value, _ in outcomes if status == "error"]
        if errors:
            logger.warning("%s: first error: %s", name, errors[0])


# ---------------------------------------------------------------------------------------------------------------------
# Public scorers and reward functions
# ---------------------------------------------------------------------------------------------------------------------


def _score_math_detailed(
    completions: Sequence[str | None],
    golds: Sequence[Any],
    *,
    max_workers: int | None,
    timeout_s: float,
    scoring: str | MathScoring = "training",
) -> list[tuple[str, float | None, int | None]]:
    """`score_math` with each result's status and worker pid (tests check that the work is spread)."""
    if len(completions) != len(golds):
        raise ValueError(f"Got {len(completions)} completions but {len(golds)} golds; they must pair up one to one.")
    scoring = MathScoring.from_spec(scoring)
    pairs: dict[tuple[str, Any], int] = {}
    slot_of: list[int | None] = []
    for text, raw_gold in zip(completions, golds):
        gold = _as_gold(raw_gold)
        if gold is None or not isinstance(text, str):
            slot_of.append(None)
            continue
        # Training reads only the final boxes, so completions that box the same answer are scored once.
        answer = text if scoring.answer == "math_verify" else tuple(extract_final_boxes(text)) or None
        slot_of.append(pairs.setdefault((gold, answer), len(pairs)))
    score = functools.partial(_score_pair, scoring)
    outcomes = _run_pool(score, list(pairs), max_workers=max_workers, timeout_s=timeout_s)
    _warn_unscored("score_math", outcomes)
    bad_golds = [gold for (gold, _), (status, value, _) in zip(pairs, outcomes) if status == "ok" and value is None]
    if bad_golds:
        logger.warning(
            "score_math: %d golds math-verify cannot parse, e.g. %.100r; scored None.", len(bad_golds), bad_golds[0]
        )
    return [("no gold", None, None) if k is None else outcomes[k] for k in slot_of]


def score_math(
    completions: list[str],
    golds: list[str],
    *,
    scoring: str | MathScoring = "training",
    max_workers: int | None = None,
    timeout_s: float = 5.0,
) -> list[float | None]:
    """
    Score final answers against gold answers with math-verify, in the worker pool, under the rules of `scoring`.

    Both presets share the gold's reading and the comparison: the gold is parsed with math-verify's default configs
    (inside `$...$`; a `\\pm` that math-verify cannot read is written out as two answers) and goes first in
    `verify(gold, pred)`, which is asymmetric. They differ only in the fields of [`MathScoring`]:

    - `"evaluation"`: math-verify's own verdicts. The answer is what math-verify's default extraction finds in the
      whole completion (as lighteval scores its maths benchmarks), boxed or not; a gold that is only text is compared
      as text.
    - `"training"` (the accuracy reward): the answer is the content of the last `\\boxed{}` (see `extract_boxed`); a
      completion without one, or with an empty one, scores 0.0. When the gold is a set or list of several answers,
      the final run of boxes is read as one answer set. When the gold is a plain number (see `_numeric_core`: an
      integer, decimal or integer fraction, with `\\$`, `\\%`, `^\\circ` or `\\text{}` units), the boxed answer must
      be one too, read after its last `=` or `\\approx`, and both are compared as those bare numbers: boxing the
      question's own arithmetic (`\\boxed{17+21}` for 38) or its unsimplified fraction (`\\frac{84}{144}` for
      `\\frac{7}{12}`) scores 0.0, while `\\boxed{x = 38}`, `\\boxed{38 \\text{ apples}}`, `\\boxed{1,000}`,
      `\\boxed{28 \\text{ percent}}` and `\\boxed{1000,99}` are read as numbers. Percentages follow math-verify:
      `50\\%` matches a gold of `50` and one of `0.5`.

    Args:
        completions (`list[str]`):
            Completion texts; an entry that is not a string scores `None`.
        golds (`list[str]`):
            Gold final answers, already extracted (`"18"`, `"\\frac{1}{2}"`, `"(-\\infty, 2]"`), one per completion.
        scoring (`str` or [`MathScoring`], *optional*, defaults to `"training"`):
            The rules: a preset of `MATH_SCORING` (`"training"`, `"evaluation"`), optionally with overrides
            (`"training,multi_box=last"`), or a `MathScoring`.
        max_workers (`int` or `None`, *optional*):
            Pool size; `None` uses every core this process may run on, `0` scores in the calling thread (time-bounded
            only on the main thread). A different size from the running pool's restarts it.
        timeout_s (`float`, *optional*, defaults to `5.0`):
            Time bound per distinct (gold, answer) pair. A worker that ignores it (stuck in C code) is killed after
            `1.5 * timeout_s + 1` seconds.

    Returns:
        `list[float | None]`: 1.0 (correct), 0.0 (wrong or no answer), or `None` when it cannot be scored: no or
        unparsable gold, timeout, or a worker crash. `None`s are counted in a logged warning.
    """
    details = _score_math_detailed(completions, golds, max_workers=max_workers, timeout_s=timeout_s, scoring=scoring)
    return [value for _, value, _ in details]


def check_golds(golds: list[str], *, max_workers: int | None = None, timeout_s: float = 5.0) -> list[bool | None]:
    """
    Whether `score_math` can read each gold answer, checked once per distinct gold in the worker pool.

    A gold math-verify cannot parse would make every completion of its problem score `None`; data loaders use this
    to drop such rows up front (`ilr.data`), with a count, rather than train on questions that can never be scored.

    Args:
        golds (`list[str]`):
            Gold final answers, already extracted (`"18"`, `"\\frac{1}{2}"`).
        max_workers (`int` or `None`, *optional*):
            Pool size, as in `score_math`.
        timeout_s (`float`, *optional*, defaults to `5.0`):
            Time bound per distinct gold, as in `score_math`.

    Returns:
        `list[bool | None]`: `True` when the gold parses, `False` when it does not (or raises, or is not a non-empty
        string), `None` when parsing timed out or crashed its worker.
    """
    distinct = list(dict.fromkeys(gold for gold in golds if isinstance(gold, str) and gold.strip()))
    outcomes = _run_pool(_gold_parses, distinct, max_workers=max_workers, timeout_s=timeout_s)
    _warn_unscored("check_golds", outcomes)
    # An exception while parsing means `score_math` fails on it too: not parsable. A timeout or crash may be the
    # machine's load rather than the gold: undecided.
    parses = {
        gold: (status == "ok" and bool(value)) if status in ("ok", "error") else None
        for gold, (status, value, _) in zip(distinct, outcomes)
    }
    return [parses.get(gold, False) if isinstance(gold, str) else False for gold in golds]


def accuracy_reward(
    completions: list, answer: list[str], math_scoring: str | MathScoring = "training", **kwargs
) -> list[float | None]:
    """
    Reward 1.0 for a correct final maths answer in `\\boxed{}`, 0.0 for a wrong or missing one (see `score_math`).

    Args:
        completions (`list[str]` or `list[list[dict]]`):
            Completions, plain or conversational (the content of the last assistant message is scored).
        answer (`list[str]`):
            The gold final answer of each completion's problem (the dataset's `answer` column).
        math_scoring (`str` or [`MathScoring`], *optional*, defaults to `"training"`):
            The scoring rules (bound from the recipe's `math_scoring` by `get_reward_funcs`).
        **kwargs:
            Other dataset columns and TRL extras. With a `task` column, rows whose task is not `"math"` score `None`
            (left to the code reward). With TRL's `log_metric`, the fraction of `None`s is logged as
            `accuracy_reward/unscored`.

    Returns:
        `list[float | None]`: One reward per completion; `None` when it cannot be scored (TRL skips it).
    """
    texts = [_completion_text(c) for c in completions]
    golds = list(answer)
    tasks = kwargs.get("task")
    if tasks is not None:
        golds = [gold if task == "math" else None for gold, task in zip(golds, tasks)]
    rewards = score_math(texts, golds, scoring=math_scoring)
    log_metric = kwargs.get("log_metric")
    if callable(log_metric) and rewards:
        math_rows = [r for r, g in zip(rewards, golds) if g is not None]
        if math_rows:
            log_metric("accuracy_reward/unscored", sum(r is None for r in math_rows) / len(math_rows))
    return rewards


def format_reward(completions: list, **kwargs) -> list[float]:
    """
    Reward 1.0 for a completion that states exactly one final answer: exactly one `\\boxed{}` (or `\\fbox{}`), closed,
    non-empty, whose content is a parsable answer.

    Parsable means a plain number (see `score_math`) or anything math-verify turns into a sympy object. The gold is not
    looked at. Several boxes score 0.0 (hedging). Meant as a small shaping term next to `accuracy_reward` (a weight of
    about 0.5 helped a tiny model learn to box its answer).

    Args:
        completions (`list[str]` or `list[list[dict]]`):
            Completions, plain or conversational (the content of the last assistant message is checked).
        **kwargs:
            Dataset columns and TRL extras, unused.

    Returns:
        `list[float]`: 1.0 or 0.0 per completion. A box whose parsing times out or crashes a worker scores 0.0 (counted
        in a logged warning).
    """
    rewards = [0.0] * len(completions)
    pending: dict[str, list[int]] = {}
    for i, completion in enumerate(completions):
        text = _completion_text(completion)
        if text is None or len(_BOX_OPEN_RE.findall(text)) != 1:
            continue
        content = extract_boxed(text)
        if not content:
            continue
        if _is_numeric_literal(content):
            rewards[i] = 1.0
        else:
            pending.setdefault(content, []).append(i)
    outcomes = _run_pool(_check_parsable, list(pending))
    _warn_unscored("format_reward", outcomes)
    for indices, (status, value, _) in zip(pending.values(), outcomes):
        for i in indices:
            rewards[i] = value if status == "ok" else 0.0
    return rewards


def code_reward(
    completions: list,
    tests: list[list[str]],
    setup: list[str] | None = None,
    allow_code_execution: bool | None = None,
    **kwargs,
) -> list[float | None]:
    """
    Reward the fraction of a problem's tests that the completion's code passes, run in `ilr.sandbox`.

    The code is the last fenced python block of the completion (`ilr.sandbox.extract_python_code`); a completion
    without one scores 0.0. All completions of a batch run concurrently, one sandbox each, on every core.

    Args:
        completions (`list[str]` or `list[list[dict]]`):
            Completions, plain or conversational (the content of the last assistant message is run).
        tests (`list[list[str]]`):
            The problem's standalone test snippets (the dataset's `tests` column).
        setup (`list[str]`, *optional*):
            Code run before each solution (the dataset's `setup` column: imports, MBPP's `test_setup_code`).
        allow_code_execution (`bool`, *optional*):
            Opt-in to run model-written code (bound from the recipe by `get_reward_funcs`); without it, or the
            environment variable `ILR_ALLOW_CODE_EXECUTION=1`, the sandbox refuses with `CodeExecutionDisabledError`.
        **kwargs:
            Other dataset columns and TRL extras. With a `task` column, rows whose task is not `"code"` score `None`.

    Returns:
        `list[float | None]`: The fraction of tests passed (tests reported before a timeout count) per completion;
        `None` when it cannot be scored: no tests, a non-code row, or a sandbox that failed to start (counted in a
        logged warning, never a silent 0).
    """
    from ilr.sandbox import extract_python_code, run_tests_batch

    setups = setup if setup is not None else [""] * len(completions)
    tasks = kwargs.get("task") or ["code"] * len(completions)
    rewards: list[float | None] = [None] * len(completions)
    jobs, job_rows = [], []
    for row, (completion, row_tests, row_setup, task) in enumerate(zip(completions, tests, setups, tasks)):
        if task != "code" or not row_tests:
            continue
        program = extract_python_code(_completion_text(completion) or "")
        if program is None:
            rewards[row] = 0.0
            continue
        jobs.append((program, list(row_tests), row_setup or ""))
        job_rows.append(row)
    results = run_tests_batch(jobs, allow=allow_code_execution)
    failures = Counter()
    for row, result in zip(job_rows, results):
        if result.status == "sandbox_error":
            failures[result.status] += 1
            continue
        rewards[row] = result.fraction
    if failures:
        logger.warning("code_reward: %d of %d programs could not be run (%s).", failures.total(), len(jobs), failures)
    return rewards


# Names accepted in recipes (`reward_funcs: [accuracy, format]`). TRL logs each reward under its function's __name__.
REWARD_FUNCS: dict[str, Callable[..., list[float | None]]] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "code": code_reward,
}


def get_reward_funcs(
    names: list[str], *, allow_code_execution: bool = False, math_scoring: str | MathScoring = "training"
) -> list[Callable[..., list[float | None]]]:
    """
    Look reward functions up by name in `REWARD_FUNCS`.

    Args:
        names (`list[str]`):
            Reward names, e.g. `["accuracy", "format"]`; a single string is read as one name.
        allow_code_execution (`bool`, *optional*, defaults to `False`):
            The recipe's opt-in for running model-written code, bound into the `code` reward.
        math_scoring (`str` or [`MathScoring`], *optional*, defaults to `"training"`):
            The recipe's maths scoring rules, bound into the `accuracy` reward when they are not the default.

    Returns:
        `list[Callable]`: The reward functions, in the order given.

    Raises:
        `ValueError`: For an unknown name; the message lists the valid ones.
    """
    if isinstance(names, str):
        names = [names]
    funcs = []
    for name in names:
        if name not in REWARD_FUNCS:
            valid = ", ".join(sorted(REWARD_FUNCS))
            raise ValueError(
                f"Unknown reward function {name!r}. Valid names: {valid}. Fix the `reward_funcs` entry of your recipe."
            )
        func = REWARD_FUNCS[name]
        # update_wrapper keeps `__name__`, which TRL uses to log the reward.
        if func is code_reward and allow_code_execution:
            func = functools.update_wrapper(functools.partial(code_reward, allow_code_execution=True), code_reward)
        if func is accuracy_reward and MathScoring.from_spec(math_scoring) != MATH_SCORING["training"]:
            scoring = MathScoring.from_spec(math_scoring)
            func = functools.update_wrapper(functools.partial(accuracy_reward, math_scoring=scoring), accuracy_reward)
        funcs.append(func)
    return funcs

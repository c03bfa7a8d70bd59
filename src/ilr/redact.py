"""Credentials out of recipes before they are written beside a run or published in a model card."""

from __future__ import annotations

import re


__all__ = ["is_credential_key", "redact_recipe"]

# Keys whose values are credentials (`hub_token`, `hf_token`, `api_key`, ...), not tokenizer settings (`pad_token`,
# `max_new_tokens`): their values are removed from any recipe shown in a card.
_SECRET_KEY = re.compile(
    r"^\s*(?:-\s+)?[\"']?(?:[\w.-]*_)?(?:hub_token|hf_token|api_token|access_token|auth_token|token|api_key|secret|"
    r"password)[\"']?\s*:",
    re.IGNORECASE,
)
_TOKENIZER_KEY = re.compile(r"^\s*(?:-\s+)?[\"']?(?:pad|eos|bos|unk|sep|cls|mask)_token[\"']?\s*:", re.IGNORECASE)


def is_credential_key(key: str) -> bool:
    """
    Whether a recipe key holds a credential (`hub_token`, `hf_token`, `api_key`, `password`, ...), not a tokenizer
    setting (`pad_token`) or a length (`max_new_tokens`).

    Args:
        key (`str`):
            The key.

    Returns:
        `bool`: Whether its value must not be shown.
    """
    return bool(_SECRET_KEY.match(f"{key}:")) and not _TOKENIZER_KEY.match(f"{key}:")


def redact_recipe(text: str) -> str:
    """
    A recipe's YAML without credentials, fit to publish in a model card.

    The value of every credential key (`hub_token`, `hf_token`, `token`, `*_api_key`, `password`, ...) is replaced by
    `<removed>`, and any Hub token left elsewhere in the text (`hf_...`) by `***`. Tokenizer settings such as
    `pad_token` are kept.

    Args:
        text (`str`):
            The recipe YAML.

    Returns:
        `str`: The redacted YAML.
    """
    from ilr.hub import scrub_token

    lines = []
    for line in text.splitlines():
        match = _SECRET_KEY.match(line)
        if match and not _TOKENIZER_KEY.match(line):
            line = f"{match.group(0)} <removed>"  # the key stays, so the YAML keeps its shape
        lines.append(line)
    return scrub_token("\n".join(lines) + ("\n" if text.endswith("\n") else ""))

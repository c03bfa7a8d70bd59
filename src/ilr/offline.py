"""Whether the Hugging Face Hub may be contacted: the one offline check of `ilr.hub` (models) and `ilr.data` (datasets).

It reads the variables as the libraries themselves do, but at each call: `huggingface_hub` and `datasets` read them
once, at import, so a variable set later (a test, a notebook) still counts here.
"""

from __future__ import annotations

import os
import sys


__all__ = ["hub_offline"]

_TRUE = ("1", "ON", "YES", "TRUE")


def _is_true(value: str | None) -> bool:
    return value is not None and value.strip().upper() in _TRUE


def hub_offline(library: str = "huggingface_hub") -> bool:
    """
    Whether offline mode is on for `library`.

    Args:
        library (`str`, *optional*, defaults to `"huggingface_hub"`):
            `huggingface_hub` (models, pushes): `HF_HUB_OFFLINE`, or `TRANSFORMERS_OFFLINE` when that is unset, as
            `huggingface_hub` reads them. `datasets`: `HF_DATASETS_OFFLINE` when set (it wins, as in `datasets`), else
            the same as `huggingface_hub`.

    Returns:
        `bool`: `True` when the Hub must not be contacted. Also `True` when the library, already imported, was told so
        (its module-level flag, set at import or by a caller).
    """
    if library not in ("huggingface_hub", "datasets"):
        raise ValueError(f"library must be 'huggingface_hub' or 'datasets' (got {library!r}).")
    env = os.environ
    offline = _is_true(env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE"))
    flag_module, flag = "huggingface_hub.constants", "HF_HUB_OFFLINE"
    if library == "datasets":
        if env.get("HF_DATASETS_OFFLINE") is not None:
            offline = _is_true(env["HF_DATASETS_OFFLINE"])
        flag_module = "datasets.config"
    # Imported modules only: importing one here would cost a second and read the same variables.
    module = sys.modules.get(flag_module)
    return offline or bool(getattr(module, flag, False))

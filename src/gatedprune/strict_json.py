"""JSON reading that refuses duplicated object keys.

Python's ``json`` keeps the last of two equal keys without a word, so a hand-edited or
tampered file (a plan, a latency model, a checkpoint's metadata) could silently mean
something other than what its first entry says. Every file gatedprune reads goes through
:func:`loads_strict` instead.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["DuplicateKeyError", "loads_strict"]


class DuplicateKeyError(ValueError):
    """A JSON object names the same key twice."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKeyError(
                f"duplicated JSON key {key!r} (a key may appear once per object)"
            )
        out[key] = value
    return out


def loads_strict(text: str | bytes) -> Any:
    """``json.loads`` that raises :class:`DuplicateKeyError` (a ``ValueError``) on an object
    with a repeated key.

    >>> loads_strict('{"a": 1}')
    {'a': 1}
    >>> try:
    ...     loads_strict('{"a": 1, "a": 2}')
    ... except ValueError as e:
    ...     print(e)
    duplicated JSON key 'a' (a key may appear once per object)
    """
    return json.loads(text, object_pairs_hook=_no_duplicates)

"""CSV cells a spreadsheet opens as data, never as a formula (CSV injection): a text cell starting with
= + - @ or a tab or carriage return gets a leading ' (OWASP's advice). Numbers pass as they are."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

DANGER = ("=", "+", "-", "@", "\t", "\r")


def safe_row(values: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for value in values:
        if value is None:
            value = ""
        elif not isinstance(value, (int, float)):
            value = str(value)
        out.append(f"'{value}" if isinstance(value, str) and value.startswith(DANGER) else value)
    return out

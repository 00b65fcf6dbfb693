"""Named SQL statements, kept in ``.sql`` files beside the code that runs them.

A file holds sections that start with ``-- name: <name>``; everything up to the next such
line is that statement.
"""

from __future__ import annotations

import hashlib
import re
from functools import cache
from pathlib import Path

HERE = Path(__file__).parent
_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


@cache
def schema() -> str:
    return (HERE / "schema.sql").read_text()


@cache
def fingerprint() -> str:
    """Changes whenever the schema does, so an older read-model file is rebuilt."""
    return hashlib.sha256(schema().encode()).hexdigest()[:16]


@cache
def queries(filename: str = "queries.sql") -> dict[str, str]:
    text = (HERE / filename).read_text()
    parts = _NAME.split(text)
    return {parts[i]: parts[i + 1].strip() for i in range(1, len(parts), 2)}


def query(name: str) -> str:
    return queries()[name]

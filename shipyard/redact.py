"""Keep secrets out of events, logs and pages.

Builder output, errors and validation output land in events that every viewer can read.
Before they do, the values of secret-looking environment variables (API keys, tokens,
passwords) and of any secret Shipyard was configured with are replaced by a marker.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

MASK = "[redacted]"
MIN_SECRET = 8  # characters: shorter values are too likely to be ordinary words
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH|COOKIE", re.I)
_extra: set[str] = set()


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def add_secret(value: str) -> None:
    """Redact ``value`` from now on (a token from a settings file, say)."""
    if len(value) >= MIN_SECRET:
        _extra.add(value)


def secrets(env: Mapping[str, str] = os.environ) -> list[str]:
    """The values to hide, longest first so a secret containing another is hidden whole."""
    found = {v for k, v in env.items() if is_secret_name(k) and len(v) >= MIN_SECRET}
    return sorted(found | _extra, key=len, reverse=True)


def redact(text: str, env: Mapping[str, str] = os.environ) -> str:
    return mask(text, secrets(env))


def mask(text: str, values: list[str]) -> str:
    """``text`` with each of ``values`` (from :func:`secrets`, taken once) masked."""
    for value in values:
        if value in text:
            text = text.replace(value, MASK)
    return text

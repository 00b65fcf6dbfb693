"""Bearer tokens mapped to roles, for the HTTP API and the dashboard.

Tokens live hashed in ``<data dir>/tokens.json`` (readable only by its owner); the admin
token is generated at the first ``shipyard up`` (or taken from ``SHIPYARD_ADMIN_TOKEN``) and
kept in ``<data dir>/admin.token``. ``shipyard token create --role viewer`` makes others.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from shipyard.errors import ConfigError
from shipyard.instance import write_private

Role = Literal["admin", "dispatcher", "builder", "viewer"]
ROLES: tuple[Role, ...] = ("admin", "dispatcher", "builder", "viewer")
TOKENS_FILE = "tokens.json"
ADMIN_FILE = "admin.token"
COOKIE = "shipyard_token"


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / TOKENS_FILE
        self._mtime = -1.0
        self._entries: dict[str, dict[str, str]] = {}

    def _load(self) -> None:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            self._entries, self._mtime = {}, -1.0
            return
        if mtime != self._mtime:
            self._entries = json.loads(self.path.read_text() or "{}")
            self._mtime = mtime

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Handlers and the gateway may write at once: read, change and write under a lock."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.data_dir / (TOKENS_FILE + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._mtime = -1.0
            self._load()
            yield
            now = datetime.now(UTC).isoformat()
            self._entries = {
                k: v for k, v in self._entries.items() if v.get("expires", "9999") > now
            }
            write_private(self.path, json.dumps(self._entries, indent=2))
            self._mtime = -1.0
        finally:
            os.close(fd)

    def create(
        self, role: Role, name: str, token: str | None = None, *, expires: datetime | None = None
    ) -> str:
        """A new token for ``name`` in ``role``; with ``expires``, it stops working then."""
        if role not in ROLES:
            raise ConfigError(f"unknown role {role!r}: choose from {', '.join(ROLES)}")
        token = token or "sy_" + secrets.token_urlsafe(24)
        entry = {"role": role, "name": name, "created": datetime.now(UTC).isoformat()}
        if expires is not None:
            entry["expires"] = expires.astimezone(UTC).isoformat()
        with self._locked():
            self._entries[_digest(token)] = entry
        return token

    def revoke(self, token: str) -> None:
        with self._locked():
            self._entries.pop(_digest(token), None)

    def check(self, token: str) -> Principal | None:
        """The principal for ``token``, compared in constant time; None if unknown."""
        if not token:
            return None
        self._load()
        wanted = _digest(token)
        found = None
        for digest, entry in self._entries.items():
            if hmac.compare_digest(digest, wanted):
                found = entry
        if found is None or found.get("expires", "9999") <= datetime.now(UTC).isoformat():
            return None
        return Principal(found["name"], found["role"])  # type: ignore[arg-type]

    def admin_token(self, env_token: str = "") -> str:
        """The admin token: from the environment, else the one kept in the data dir, else new."""
        path = self.data_dir / ADMIN_FILE
        if env_token:
            if self.check(env_token) is None:
                self.create("admin", "admin (from SHIPYARD_ADMIN_TOKEN)", env_token)
            return env_token
        try:
            token = path.read_text().strip()
        except FileNotFoundError:
            token = ""
        if token and self.check(token) is not None:
            return token
        token = self.create("admin", "admin")
        write_private(path, token + "\n")
        return token

"""A nats-server in operator (JWT) mode, as secured clusters run: an operator, an account with
JetStream, and a user whose ``.creds`` file is the only way in. Keys are real NKeys and every
JWT is signed by its issuer, so the server checks them as it would any others."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import nkeys

from shipyard.embedded import EmbeddedNats

UNLIMITED = dict.fromkeys(
    [
        "subs",
        "data",
        "payload",
        "imports",
        "exports",
        "conn",
        "leaf",
        "mem_storage",
        "disk_storage",
        "streams",
        "consumer",
    ],
    -1,
)
HEADER = json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _keypair(prefix: int) -> tuple[Any, bytes]:
    seed = nkeys.encode_seed(os.urandom(32), prefix)
    return nkeys.from_seed(bytearray(seed)), seed


def _jwt(issuer: Any, subject: str, name: str, claims: dict[str, Any]) -> str:
    body: dict[str, Any] = {
        "iat": int(time.time()),
        "iss": issuer.public_key.decode(),
        "name": name,
        "sub": subject,
        "nats": {**claims, "version": 2},
    }
    body["jti"] = (
        base64.b32encode(hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest())
        .decode()
        .rstrip("=")
    )
    signed = f"{_b64(HEADER)}.{_b64(json.dumps(body).encode())}"
    return f"{signed}.{_b64(issuer.sign(signed.encode()))}"


class OperatorNats(EmbeddedNats):
    """Started like the embedded server, but trusting only JWTs signed by its operator."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        operator, _ = _keypair(nkeys.PREFIX_BYTE_OPERATOR)
        account, _ = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)
        system, _ = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)
        user, user_seed = _keypair(nkeys.PREFIX_BYTE_USER)
        self._operator = _jwt(operator, operator.public_key.decode(), "op", {"type": "operator"})
        self._accounts = {
            account.public_key.decode(): _jwt(
                operator,
                account.public_key.decode(),
                "shipyard",
                {"type": "account", "limits": {**UNLIMITED, "wildcards": True}},
            ),
            system.public_key.decode(): _jwt(
                operator, system.public_key.decode(), "SYS", {"type": "account"}
            ),
        }
        self._system = system.public_key.decode()
        user_jwt = _jwt(
            account,
            user.public_key.decode(),
            "shipyard-service",
            {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1},
        )
        self.creds_path = root / "service.creds"
        root.mkdir(parents=True, exist_ok=True)
        self.creds_path.write_text(
            f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
            f"-----BEGIN USER NKEY SEED-----\n{user_seed.decode()}\n"
            "------END USER NKEY SEED------\n"
        )

    def write_config(self) -> None:
        preload = "\n".join(f"  {key}: {jwt}" for key, jwt in self._accounts.items())
        self.config_path.write_text(
            f"listen: {json.dumps(f'{self.host}:{self.port}')}\n"
            f"operator: {self._operator}\n"
            f"system_account: {self._system}\n"
            "resolver: MEMORY\n"
            f"resolver_preload: {{\n{preload}\n}}\n"
            f"jetstream {{\n  store_dir: {json.dumps(str(self.store_dir))}\n}}\n"
        )

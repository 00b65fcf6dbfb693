"""Who may do what on NATS: one user per role, each with the subjects it may use.

The embedded nats-server is started with these users, so a process can only do what its
role needs, whatever it tries:

- ``service`` — handlers, the command service, the projector, the gateway and the bot:
  everything, and the only user that may append events (``sy.ev.>``) or change the stream.
- ``admin`` — the operator's CLI on this machine: every command and query, reading the log;
  it changes things only through the command service, never by appending events itself.
- ``dispatcher`` — dispatch, cancel, retry, escalate, messages, queries.
- ``viewer`` — queries and reading the log; nothing that changes anything.
- ``builder-<agent>`` — one per agent: send and mark read as that agent only, its own inbox,
  the read-only queries. It cannot append a phase, a heartbeat or anything else.

Commands and queries about one agent's own comms carry the agent in the subject
(``sy.cmd.send.<agent>``, ``sy.qry.inbox.<agent>``); the services check that the body
speaks for that same agent, so a builder's permission on its subject is the whole check.
Each user's replies come to its own inbox prefix (``_INBOX.<user>.``), so nobody can listen
to answers meant for someone else.

Passwords are generated once per data dir and kept in ``<data dir>/nats/users.json``,
readable only by its owner. ``shipyard nats-user ROLE`` prints one user's settings.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from shipyard.errors import ConfigError
from shipyard.events.dispatch import NAME_PATTERN
from shipyard.events.log import STREAM
from shipyard.instance import read_info, write_private

if TYPE_CHECKING:
    from shipyard.settings import Settings

Role = Literal["service", "admin", "dispatcher", "viewer", "builder"]
ROLES: tuple[Role, ...] = ("service", "admin", "dispatcher", "viewer", "builder")
USERS_FILE = "users.json"
INBOX = "_INBOX"
_NAME = re.compile(NAME_PATTERN.strip("^$"))

# Queries anyone may ask; ``inbox`` is scoped per agent for builders.
READ_QUERIES = (
    "status",
    "history",
    "task",
    "tasks",
    "run",
    "activity",
    "kanban",
    "digests",
    "thread",
    "threads",
)
OWN_COMMS = ("send", "mark_read")  # commands a builder may send for its own agent
OPERATOR_COMMANDS = ("dispatch", "cancel", "retry", "escalate", *OWN_COMMS)


def token(name: str) -> str:
    """``name`` as one NATS subject token: agent names may hold dots, which separate
    tokens; ``~`` is not allowed in names, so the mapping cannot collide. A string that is
    no agent name gives a token no agent has, so it is refused, never misrouted."""
    if not _NAME.fullmatch(name):
        return "~invalid~"
    return name.replace(".", "~")


def user_name(role: Role, agent: str = "") -> str:
    if role == "builder":
        if not agent:
            raise ConfigError("a builder user belongs to one agent: say which")
        return f"builder-{agent}"
    return role


def inbox_prefix(user: str) -> str:
    return f"{INBOX}.{token(user)}"


def _log_reading() -> list[str]:
    """JetStream API subjects for reading the log, and nothing that changes it."""
    api = "$JS.API"
    return [
        f"{api}.INFO",
        f"{api}.STREAM.NAMES",
        f"{api}.STREAM.MSG.GET.{STREAM}",
        f"{api}.DIRECT.GET.{STREAM}",
        f"{api}.DIRECT.GET.{STREAM}.>",
        f"{api}.CONSUMER.CREATE.{STREAM}",
        f"{api}.CONSUMER.CREATE.{STREAM}.>",
        f"{api}.CONSUMER.INFO.{STREAM}.>",
        f"$JS.FC.{STREAM}.>",  # ordered consumers answer flow control
    ]


def permissions(role: Role, agent: str = "") -> dict[str, Any]:
    """The nats-server ``permissions`` block for a user in ``role``."""
    user = user_name(role, agent)
    if role == "service":
        return {"publish": {"allow": [">"]}, "subscribe": {"allow": [">"]}}
    subscribe = [f"{inbox_prefix(user)}.>", "sy.status.>"]
    # Stream info (counts, the last sequence) lets a query wait until it is fresh.
    queries = [f"sy.qry.{q}" for q in READ_QUERIES] + [f"$JS.API.STREAM.INFO.{STREAM}"]
    if role == "builder":
        me = token(agent)
        publish = [
            *queries,
            f"sy.qry.inbox.{me}",
            *(f"sy.cmd.{c}.{me}" for c in OWN_COMMS),
        ]
        return {"publish": {"allow": publish}, "subscribe": {"allow": subscribe}}
    publish = [*queries, "sy.qry.inbox", "sy.qry.inbox.*"]
    if role in ("admin", "dispatcher"):
        publish += [f"sy.cmd.{c}" for c in OPERATOR_COMMANDS]
        publish += [f"sy.cmd.{c}.*" for c in OWN_COMMS]
    if role in ("admin", "viewer"):
        publish += _log_reading()
    return {"publish": {"allow": publish}, "subscribe": {"allow": subscribe}}


@dataclass(frozen=True)
class Credentials:
    """How one client authenticates to NATS; empty fields are not sent."""

    user: str = ""
    password: str = field(default="", repr=False)
    creds_file: str = ""  # a NATS .creds file (JWT + NKey seed) for a secured cluster
    token: str = field(default="", repr=False)

    def connect_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.user:
            options["user"] = self.user
            options["password"] = self.password
            options["inbox_prefix"] = inbox_prefix(self.user).encode()
        if self.creds_file:
            options["user_credentials"] = self.creds_file
        if self.token:
            options["token"] = self.token
        return options

    def __bool__(self) -> bool:
        return bool(self.user or self.creds_file or self.token)


def nats_dir(data_dir: Path) -> Path:
    """Where the embedded server keeps its config, store and users."""
    return data_dir / "nats"


def credentials_for(settings: Settings, role: Role = "admin") -> Credentials:
    """The credentials a process of ``role`` connects with: the configured ones when any are
    set (``--nats-creds``, ``SHIPYARD_NATS_USER``…), else — on the embedded default — the
    role's user from the data dir, else none (an external server without auth)."""
    configured = Credentials(
        user=settings.nats_user,
        password=settings.nats_password,
        creds_file=settings.nats_creds,
        token=settings.nats_token,
    )
    if configured:
        if configured.creds_file and not Path(configured.creds_file).is_file():
            raise ConfigError(
                f"NATS credentials file {configured.creds_file} does not exist: check "
                "--nats-creds / SHIPYARD_NATS_CREDS"
            )
        return configured
    if settings.embedded:
        running = read_info(settings.data_dir)
        if running is not None and not running.get("embedded", True):
            return Credentials()  # this data dir's `up` uses a server of its own choosing
        return Users.load(nats_dir(settings.data_dir)).credentials(role)
    return Credentials()


class Users:
    """The embedded server's users and their passwords, kept in ``<nats dir>/users.json``."""

    def __init__(self, nats_dir: Path) -> None:
        self.path = nats_dir / USERS_FILE
        self.passwords: dict[str, str] = {}

    @classmethod
    def ensure(cls, nats_dir: Path, agents: list[str]) -> Users:
        """Load the users, adding any that are missing (the fixed roles, and one builder
        per agent); passwords once made are kept, so agents' settings stay valid."""
        users = cls(nats_dir)
        users.passwords = users._read() if users.path.exists() else {}
        wanted = [user_name(r) for r in ROLES if r != "builder"]
        wanted += [user_name("builder", a) for a in agents]
        missing = [u for u in wanted if u not in users.passwords]
        for user in missing:
            users.passwords[user] = secrets.token_urlsafe(24)
        if missing or not users.path.exists():
            nats_dir.mkdir(parents=True, exist_ok=True)
            write_private(users.path, json.dumps(users.passwords, indent=2) + "\n")
        return users

    @classmethod
    def load(cls, nats_dir: Path) -> Users:
        users = cls(nats_dir)
        users.passwords = users._read()
        return users

    def _read(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            raise ConfigError(
                f"no NATS users at {self.path}: start Shipyard once with `shipyard up` on "
                "this data dir"
            ) from None
        except PermissionError:
            raise ConfigError(
                f"cannot read {self.path}: run as the user who runs `shipyard up`, or set "
                "SHIPYARD_NATS_USER and SHIPYARD_NATS_PASSWORD (see `shipyard nats-user`)"
            ) from None
        except ValueError as e:
            raise ConfigError(
                f"{self.path} is not valid JSON ({e}); delete it to start over"
            ) from e
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in data.items()
        ):
            raise ConfigError(f"{self.path} is not a map of users to passwords; delete it")
        return data

    def credentials(self, role: Role, agent: str = "") -> Credentials:
        user = user_name(role, agent)
        password = self.passwords.get(user)
        if password is None:
            known = ", ".join(sorted(self.passwords))
            raise ConfigError(
                f"no NATS user {user!r} on this data dir (it has {known}); builder users exist "
                "for the agents configured when `shipyard up` last started"
            )
        return Credentials(user=user, password=password)

    def authorization(self) -> dict[str, Any]:
        """The server's ``authorization`` block: every user with its permissions."""
        entries = []
        for user, password in sorted(self.passwords.items()):
            role, _, agent = user.partition("-")
            if role not in ROLES:
                continue
            entries.append(
                {
                    "user": user,
                    "password": password,
                    "permissions": permissions(role, agent),
                }
            )
        return {"users": entries}

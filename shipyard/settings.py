"""Settings: defaults, then ``shipyard.toml``, then ``SHIPYARD_*`` environment variables,
then command-line flags — each overriding the one before.

The settings file is ``<data dir>/shipyard.toml`` unless ``--config`` or
``SHIPYARD_CONFIG`` names another.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from shipyard.errors import ConfigError
from shipyard.events.types import AlertKind

ENV_PREFIX = "SHIPYARD_"


def default_data_dir(env: Mapping[str, str] = os.environ) -> Path:
    """``$XDG_DATA_HOME/shipyard``, else ``~/.local/share/shipyard``."""
    base = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "shipyard"


def default_workdir_roots() -> list[Path]:
    return [Path.home(), Path("/tmp")]


class AgentSettings(BaseModel):
    """One builder: ``[agents.NAME]`` in shipyard.toml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["claude", "codex", "command"]
    binary: str = Field(default="", description="the program; default `claude` or `codex`")
    command: list[str] = Field(
        default_factory=list,
        description="for kind=command: argv; {prompt}, {phase}, {workdir} are filled in",
    )
    model: str = ""
    permission_mode: str = Field(
        default="bypassPermissions",
        description="Claude Code permission mode for BUILD and HEAL (PLAN always uses plan)",
    )
    allowed_tools: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    concurrency: int = Field(default=2, ge=1, le=1000)


def default_agents() -> dict[str, AgentSettings]:
    return {"claude": AgentSettings(kind="claude")}


class HandlerSettings(BaseModel):
    """``[handler]`` in shipyard.toml. Times are in seconds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    concurrency: int = Field(default=4, ge=1, le=1000, description="runs at once per handler")
    heartbeat_interval: float = Field(default=180.0, gt=0)
    stale_after: float = Field(default=600.0, gt=0)
    failed_after: float = Field(default=900.0, gt=0)
    max_heal_rounds: int = Field(default=5, ge=0, le=50)
    max_attempts: int = Field(default=2, ge=1, le=20, description="1: never retry on its own")
    retry_backoff: float = Field(default=30.0, ge=0)
    default_agent: str = "claude"
    hold_dependants: bool = Field(
        default=False, description="keep dependants blocked when a prerequisite fails"
    )
    workdir_roots: list[Path] = Field(default_factory=default_workdir_roots)
    escalate: dict[str, str] = Field(
        default_factory=dict,
        description="on a task's final failure on agent KEY, escalate it to agent VALUE",
    )
    builder_timeout: float = Field(default=4 * 3600.0, gt=0, description="wall clock per call")
    validate_timeout: float = Field(default=900.0, gt=0)
    result_grace: float = Field(
        default=5.0, gt=0, description="a builder that printed its result must exit by then"
    )
    kill_grace: float = Field(default=3.0, gt=0, description="SIGTERM, then SIGKILL after")

    @field_validator("escalate")
    @classmethod
    def _escalate_elsewhere(cls, value: dict[str, str]) -> dict[str, str]:
        for source, target in value.items():
            if source == target:
                raise ValueError(f"escalate: {source} = {target!r} would hand a task to itself")
        return value

    @field_validator("failed_after")
    @classmethod
    def _after_stale(cls, value: float, info: Any) -> float:
        stale = info.data.get("stale_after")
        if stale is not None and value <= stale:
            raise ValueError(f"failed_after ({value}) must be longer than stale_after ({stale})")
        return value


class GatewaySettings(BaseModel):
    """``[gateway]`` in shipyard.toml: the HTTP API, the live event stream and the dashboard."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(default="127.0.0.1", description="loopback unless told otherwise")
    port: int = Field(default=7780, ge=0, le=65535, description="0: any free port")
    public_url: str = Field(default="", description="how links in alerts reach the dashboard")
    sse_ping: float = Field(default=15.0, gt=0, description="seconds between keep-alive pings")
    sse_send_timeout: float = Field(
        default=10.0, gt=0, description="a client that cannot take an event this long is dropped"
    )


class OpenClawSettings(BaseModel):
    """``[openclaw]`` in shipyard.toml: report back to OpenClaw's hooks endpoint when a task it
    dispatched ends, goes STALE or fails."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hooks_url: str = Field(default="", description="e.g. http://127.0.0.1:18789/hooks; empty: off")
    token: str = Field(default="", description="the hooks token (better: SHIPYARD_OPENCLAW_TOKEN)")
    agent_id: str = Field(default="main", description="agentId: which OpenClaw agent is told")
    dispatchers: list[str] = Field(
        default_factory=lambda: ["openclaw"], description="report tasks dispatched by these names"
    )
    extra: dict[str, Any] = Field(
        default_factory=dict, description="more fields for every request body (deliver, channel…)"
    )
    horizon: float = Field(
        default=86400.0, gt=0, description="after a restart, report what was missed this far back"
    )
    max_attempts: int = Field(default=10, ge=1, le=100)
    backoff: float = Field(default=1.0, gt=0, description="first retry delay; doubles each time")
    max_backoff: float = Field(default=300.0, gt=0)
    timeout: float = Field(default=10.0, gt=0, description="seconds per request")

    @field_validator("hooks_url")
    @classmethod
    def _http(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value.rstrip("/")


def default_alerts() -> list[AlertKind]:
    return [kind for kind in AlertKind if kind != AlertKind.PHASE]


class TelegramSettings(BaseModel):
    """``[telegram]`` in shipyard.toml: alerts to the operator's phone and a few commands.

    Nothing Telegram runs unless both ``token`` and ``chat_ids`` are set.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    token: SecretStr = Field(default=SecretStr(""), description="from @BotFather")
    chat_ids: list[int] = Field(
        default_factory=list, description="chats that get alerts and may send commands"
    )
    api_base: str = Field(default="", description="another Bot API server; empty: Telegram's")
    alerts: list[AlertKind] = Field(default_factory=default_alerts)
    horizon: float = Field(
        default=86400.0, ge=0, description="seconds: after downtime, older events send nothing"
    )
    inbox_agent: str = Field(default="operator", description="whose inbox /inbox shows")
    poll_timeout: int = Field(default=30, ge=1, le=50, description="getUpdates long poll")
    request_timeout: float = Field(default=30.0, gt=0, description="one Bot API call, polls aside")
    retry_initial: float = Field(default=1.0, gt=0, description="first backoff after an error")
    retry_max: float = Field(default=60.0, gt=0, description="longest backoff")

    @field_validator("chat_ids", "alerts", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, int):
            return [value]
        return value

    @field_validator("token")
    @classmethod
    def _token_shape(cls, value: SecretStr) -> SecretStr:
        token = value.get_secret_value()
        bot_id, colon, secret = token.partition(":")
        if token and not (bot_id.isdigit() and colon and secret and not secret.isspace()):
            raise ValueError("is not a bot token: @BotFather gives one like 123456:ABC-DEF1234")
        return value

    @field_validator("api_base")
    @classmethod
    def _api_url(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} is not a URL; write it as http://host:8081")
        return value.rstrip("/")

    @property
    def enabled(self) -> bool:
        return bool(self.token.get_secret_value() and self.chat_ids)


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    data_dir: Path = Field(default_factory=default_data_dir)
    nats_url: list[str] = Field(
        default_factory=list,
        description="NATS servers to use; empty starts the embedded nats-server",
    )
    nats_user: str = ""
    nats_password: str = ""
    nats_creds: str = Field(
        default="", description="a NATS .creds file (JWT and NKey seed) for a secured cluster"
    )
    nats_token: str = ""
    stream_replicas: int = Field(default=1, ge=1, le=5)
    handler: HandlerSettings = Field(default_factory=HandlerSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    telegram: TelegramSettings = Field(default_factory=TelegramSettings)
    agents: dict[str, AgentSettings] = Field(default_factory=default_agents)
    openclaw: OpenClawSettings = Field(default_factory=OpenClawSettings)

    @field_validator("nats_url", mode="before")
    @classmethod
    def _split_urls(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [u.strip() for u in value.split(",") if u.strip()]
        return value

    @field_validator("nats_url")
    @classmethod
    def _check_urls(cls, value: list[str]) -> list[str]:
        for url in value:
            if "://" not in url:
                raise ValueError(f"{url!r} is not a URL; write it as nats://host:4222")
        return value

    @property
    def embedded(self) -> bool:
        return not self.nats_url


_ENV_FIELDS = {
    "DATA_DIR": "data_dir",
    "NATS_URL": "nats_url",
    "NATS_USER": "nats_user",
    "NATS_PASSWORD": "nats_password",
    "NATS_CREDS": "nats_creds",
    "NATS_TOKEN": "nats_token",
    "STREAM_REPLICAS": "stream_replicas",
}
_ENV_HANDLER_FIELDS = {
    "HEARTBEAT_INTERVAL": "heartbeat_interval",
    "STALE_AFTER": "stale_after",
    "FAILED_AFTER": "failed_after",
    "HANDLER_CONCURRENCY": "concurrency",
    "MAX_HEAL_ROUNDS": "max_heal_rounds",
    "MAX_ATTEMPTS": "max_attempts",
    "DEFAULT_AGENT": "default_agent",
}
_ENV_TELEGRAM_FIELDS = {
    "TELEGRAM_TOKEN": "token",
    "TELEGRAM_CHAT_IDS": "chat_ids",
    "TELEGRAM_API_BASE": "api_base",
    "TELEGRAM_ALERTS": "alerts",
    "TELEGRAM_HORIZON": "horizon",
}


def load(
    *,
    config_file: Path | None = None,
    env: Mapping[str, str] = os.environ,
    **overrides: Any,
) -> Settings:
    """Build the settings from every source; ``overrides`` (flags) win, ``None`` is unset."""
    values: dict[str, Any] = {}
    from_env = {
        field: env[ENV_PREFIX + name]
        for name, field in _ENV_FIELDS.items()
        if env.get(ENV_PREFIX + name)
    }
    flags = {k: v for k, v in overrides.items() if v is not None}
    data_dir = Path(flags.get("data_dir") or from_env.get("data_dir") or default_data_dir(env))
    path = config_file or (Path(env["SHIPYARD_CONFIG"]) if env.get("SHIPYARD_CONFIG") else None)
    if path is None and (data_dir / "shipyard.toml").is_file():
        path = data_dir / "shipyard.toml"
    if path is not None:
        values.update(_read_file(path))
    values.update(from_env)
    handler_env: dict[str, Any] = {
        field: env[ENV_PREFIX + name]
        for name, field in _ENV_HANDLER_FIELDS.items()
        if env.get(ENV_PREFIX + name)
    }
    if env.get(ENV_PREFIX + "WORKDIR_ROOTS"):
        handler_env["workdir_roots"] = env[ENV_PREFIX + "WORKDIR_ROOTS"].split(os.pathsep)
    if handler_env:
        values["handler"] = {**values.get("handler", {}), **handler_env}
    gateway_env: dict[str, Any] = {}
    for name, field in (("HOST", "host"), ("PORT", "port"), ("PUBLIC_URL", "public_url")):
        if env.get(ENV_PREFIX + name):
            gateway_env[field] = env[ENV_PREFIX + name]
    if gateway_env:
        values["gateway"] = {**values.get("gateway", {}), **gateway_env}
    openclaw_env = {
        field: env[ENV_PREFIX + name]
        for name, field in (
            ("OPENCLAW_HOOKS_URL", "hooks_url"),
            ("OPENCLAW_TOKEN", "token"),
            ("OPENCLAW_AGENT_ID", "agent_id"),
        )
        if env.get(ENV_PREFIX + name)
    }
    if openclaw_env:
        values["openclaw"] = {**values.get("openclaw", {}), **openclaw_env}
    telegram_env: dict[str, Any] = {
        field: env[ENV_PREFIX + name]
        for name, field in _ENV_TELEGRAM_FIELDS.items()
        if env.get(ENV_PREFIX + name)
    }
    if telegram_env:
        values["telegram"] = {**values.get("telegram", {}), **telegram_env}
    values.update(flags)
    values["data_dir"] = Path(values.get("data_dir", data_dir)).expanduser()
    try:
        return Settings.model_validate(values)
    except ValidationError as e:
        where = f" (from {path})" if path else ""
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()
        )
        raise ConfigError(f"invalid settings{where}: {problems}") from e


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"settings file {path} does not exist") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"settings file {path} is not valid TOML: {e}") from e

"""``shipyard init claude`` and ``shipyard init openclaw``: teach an agent to work with Shipyard.

Each writes only what it owns and merges into what is there: a marked block in CLAUDE.md,
one hook in ``.claude/settings.json``, one server in ``.mcp.json``, one skill folder. Running
it again updates those and changes nothing else. A file it cannot read as JSON is left alone
and reported, never overwritten.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shipyard.errors import ConfigError, ShipyardError
from shipyard.gateway.auth import Role, TokenStore
from shipyard.gateway.client import agent_token_path
from shipyard.instance import write_private
from shipyard.settings import default_data_dir

TEMPLATES = Path(__file__).parent / "templates"
BEGIN = "<!-- shipyard:begin (written by `shipyard init claude`; edits inside are replaced) -->"
END = "<!-- shipyard:end -->"
SKILL_NAME = "shipyard"


@dataclass
class Written:
    """What an init did, to tell the user."""

    files: list[tuple[Path, str]] = field(default_factory=list)  # path, what happened
    notes: list[str] = field(default_factory=list)


def shipyard_argv() -> list[str]:
    """How another program should start this shipyard: by name when that name finds this
    install on PATH (portable across machines), else by this install's own path."""
    ours = Path(sys.executable).parent / "shipyard"
    found = shutil.which("shipyard")
    if found and (not ours.exists() or Path(found).resolve() == ours.resolve()):
        return ["shipyard"]
    if ours.exists():
        return [str(ours)]
    return [sys.executable, "-m", "shipyard.cli"]


def _is_our_hook(hook: Any) -> bool:
    command = hook.get("command", "") if isinstance(hook, dict) else ""
    return "shipyard" in command and " inbox " in command and "--hook" in command


def _data_args(data_dir: Path) -> list[str]:
    if data_dir.expanduser().resolve() == default_data_dir().resolve():
        return []
    return ["--data-dir", str(data_dir)]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        value = json.loads(path.read_text() or "{}")
    except (ValueError, OSError) as e:
        raise ShipyardError(f"{path} is not valid JSON ({e}); fix it and run init again") from e
    if not isinstance(value, dict):
        raise ShipyardError(f"{path} holds no JSON object; fix it and run init again")
    return value


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def ensure_token(data_dir: Path, agent: str, role: Role, *, renew: bool = False) -> str:
    """The agent's saved token (made if missing) under ``<data dir>/agents/``."""
    path = agent_token_path(data_dir, agent)
    if path.exists() and not renew:
        return "kept"
    token = TokenStore(data_dir).create(role, agent)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private(path, token + "\n")
    return "made"


def _merge_block(text: str, block: str) -> str:
    wrapped = f"{BEGIN}\n{block.strip()}\n{END}"
    if BEGIN.split(" (")[0] in text and END in text:
        start = text.index(BEGIN.split(" (")[0])
        end = text.index(END, start) + len(END)
        return text[:start] + wrapped + text[end:]
    return (text.rstrip() + "\n\n" if text.strip() else "") + wrapped + "\n"


def init_claude(
    project: Path, *, agent: str, data_dir: Path, role: Role = "builder", renew: bool = False
) -> Written:
    """CLAUDE.md block, SessionStart hook and MCP server for agent ``agent`` in ``project``."""
    if not project.is_dir():
        raise ConfigError(f"{project} is not a directory; create it or name another")
    done = Written()
    argv = shipyard_argv()
    data = _data_args(data_dir)

    claude_md = project / "CLAUDE.md"
    before = claude_md.read_text() if claude_md.exists() else ""
    block = (TEMPLATES / "claude.md").read_text().format(agent=agent)
    claude_md.write_text(_merge_block(before, block))
    done.files.append((claude_md, "updated" if BEGIN.split(" (")[0] in before else "written"))

    settings_path = project / ".claude" / "settings.json"
    settings = _read_json(settings_path)
    command = shlex.join([*argv, "inbox", "--agent", agent, "--hook", *data])
    hooks = settings.setdefault("hooks", {})
    if not isinstance(hooks, dict):
        raise ShipyardError(f"{settings_path}: `hooks` is not an object; fix it and run again")
    entries = hooks.setdefault("SessionStart", [])
    ours = {"type": "command", "command": command, "timeout": 30}
    if not isinstance(entries, list):
        raise ShipyardError(f"{settings_path}: `hooks.SessionStart` is not a list; fix it")
    kept = [
        e
        for e in entries
        if not (isinstance(e, dict) and any(_is_our_hook(h) for h in e.get("hooks", [])))
    ]
    hooks["SessionStart"] = [*kept, {"matcher": "", "hooks": [ours]}]
    _write_json(settings_path, settings)
    done.files.append((settings_path, "SessionStart hook set"))

    mcp_path = project / ".mcp.json"
    mcp = _read_json(mcp_path)
    servers = mcp.setdefault("mcpServers", {})
    servers["shipyard"] = {"command": argv[0], "args": [*argv[1:], "mcp", "--agent", agent, *data]}
    _write_json(mcp_path, mcp)
    done.files.append((mcp_path, "shipyard MCP server set"))

    made = ensure_token(data_dir, agent, role, renew=renew) == "made"
    where = agent_token_path(data_dir, agent)
    what = f"made a {role} token" if made else "kept the token"
    done.notes.append(f"{agent}: {what} in {where} (outside the project, readable by you only)")
    return done


def default_skills_dir() -> Path:
    return Path.home() / ".openclaw" / "skills"


def init_openclaw(skills_dir: Path, *, dispatcher: str, data_dir: Path) -> Written:
    """The ``shipyard`` skill folder (SKILL.md) for OpenClaw, under ``skills_dir``."""
    folder = skills_dir / SKILL_NAME
    folder.mkdir(parents=True, exist_ok=True)
    data = _data_args(data_dir)
    flag = (" " + shlex.join(data)) if data else ""
    note = (
        f"\n\nThis Shipyard keeps its data in {data_dir}: add `{shlex.join(data)}` to every "
        "command, as below."
        if data
        else ""
    )
    text = (TEMPLATES / "openclaw-skill.md").read_text()
    text = text.format(dispatcher=dispatcher, data_dir_flag=flag, data_dir_note=note)
    path = folder / "SKILL.md"
    existed = path.exists()
    path.write_text(text)
    done = Written(files=[(path, "updated" if existed else "written")])
    done.notes.append(
        "Report-back: set [openclaw] hooks_url and token (or SHIPYARD_OPENCLAW_HOOKS_URL and "
        f"SHIPYARD_OPENCLAW_TOKEN) so tasks dispatched by {dispatcher} are reported to it."
    )
    return done

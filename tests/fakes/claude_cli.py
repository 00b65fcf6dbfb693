"""Find and run the real Claude Code CLI against the loopback API stand-in.

Lookup order for the binary: ``$SHIPYARD_CLAUDE_BIN``, ``node_modules/.bin/claude`` under the
repo root (``npm install --no-save --no-audit --no-fund @anthropic-ai/claude-code@2.1.330``),
then ``claude`` on PATH. A missing CLI skips the test, unless ``SHIPYARD_REQUIRE_CLAUDE=1``, when
it fails instead (CI sets it so a broken install cannot pass silently).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PINNED_VERSION = "2.1.330"
INSTALL_COMMAND = (
    f"npm install --no-save --no-audit --no-fund @anthropic-ai/claude-code@{PINNED_VERSION}"
)

#: Environment that keeps a CLI run offline, quiet and away from the real ~/.claude.
QUIET_ENV: dict[str, str] = {
    # Documented as DISABLE_AUTOUPDATER + DISABLE_BUG_COMMAND + DISABLE_ERROR_REPORTING +
    # DISABLE_TELEMETRY; it also stops the HEAD /api/hello probe. Those four are set anyway.
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "DISABLE_AUTOUPDATER": "1",
    "DISABLE_TELEMETRY": "1",
    "DISABLE_ERROR_REPORTING": "1",
    "DISABLE_BUG_COMMAND": "1",
    "CLAUDE_CODE_DISABLE_FEEDBACK_SURVEY": "1",
    "CLAUDE_CODE_DISABLE_TERMINAL_TITLE": "1",
    "CLAUDE_CODE_DISABLE_AUTO_MEMORY": "1",
    "DISABLE_COST_WARNINGS": "1",
    "IS_SANDBOX": "1",  # root may use --dangerously-skip-permissions
}


def find_claude() -> str | None:
    """The CLI binary to use, or None: $SHIPYARD_CLAUDE_BIN, repo node_modules, then PATH."""
    explicit = os.environ.get("SHIPYARD_CLAUDE_BIN")
    if explicit:
        path = Path(explicit)
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
        return shutil.which(explicit)
    local = REPO_ROOT / "node_modules" / ".bin" / "claude"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("claude")


@functools.cache
def claude_version(binary: str) -> str | None:
    """``claude --version`` (e.g. ``2.1.330 (Claude Code)``), or None if it does not run.

    npm leaves a placeholder script at bin/claude.exe when the package's postinstall did not
    run (``--ignore-scripts``) or the native optional dependency is missing; this catches it.
    """
    try:
        proc = subprocess.run(
            [binary, "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except OSError:
        return None
    out = proc.stdout.strip()
    return out if proc.returncode == 0 and "Claude Code" in out else None


def require_claude() -> str:
    """The CLI binary; skips the test when it is missing (fails if SHIPYARD_REQUIRE_CLAUDE=1)."""
    binary = find_claude()
    reason = None
    if binary is None:
        reason = f"Claude Code CLI not found; install it with: {INSTALL_COMMAND}"
    elif claude_version(binary) is None:
        reason = f"{binary} does not run (placeholder left by npm?); reinstall: {INSTALL_COMMAND}"
    if reason is not None:
        if os.environ.get("SHIPYARD_REQUIRE_CLAUDE") == "1":
            pytest.fail(f"SHIPYARD_REQUIRE_CLAUDE=1 but {reason}")
        pytest.skip(reason)
    assert binary is not None
    return binary


def claude_env(base_url: str, home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Env for a CLI run against the stand-in at ``base_url``, with HOME/config under ``home``.

    Inherits PATH and the like, drops ``CLAUDECODE`` (which makes the CLI think it is nested)
    and every ``ANTHROPIC_*`` / ``CLAUDE_*`` setting of the caller's shell.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "CLAUDECODE" and not k.startswith(("ANTHROPIC_", "CLAUDE_", "SHIPYARD_CLAUDE"))
    }
    for sub in ("run", "tmp"):
        (home / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
    env.update(QUIET_ENV)
    env.update(
        HOME=str(home),
        CLAUDE_CONFIG_DIR=str(home / ".claude"),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_CACHE_HOME=str(home / ".cache"),
        XDG_DATA_HOME=str(home / ".local" / "share"),
        XDG_STATE_HOME=str(home / ".local" / "state"),
        XDG_RUNTIME_DIR=str(home / "run"),  # its messaging socket (falls back to /tmp if long)
        CLAUDE_CODE_TMPDIR=str(home / "tmp"),  # task output files (default /tmp/claude-<uid>)
        ANTHROPIC_BASE_URL=base_url,
        ANTHROPIC_API_KEY="sk-test",
    )
    env.update(extra or {})
    return env


def claude_args(
    binary: str, prompt: str, *extra: str, permission_mode: str | None = None
) -> list[str]:
    """``claude -p PROMPT --output-format stream-json --verbose`` plus a permission flag.

    ``permission_mode`` None means ``--dangerously-skip-permissions`` (needs IS_SANDBOX=1 as
    root); otherwise ``--permission-mode <mode>`` (e.g. ``plan``, ``bypassPermissions``).
    """
    args = [binary, "-p", prompt, "--output-format", "stream-json", "--verbose"]
    if permission_mode is None:
        args.append("--dangerously-skip-permissions")
    else:
        args += ["--permission-mode", permission_mode]
    return [*args, *extra]


@dataclass
class ClaudeRun:
    """The outcome of one CLI run: exit code, stream-json lines and stderr."""

    returncode: int
    lines: list[dict[str, Any]]
    stdout: str
    stderr: str

    @property
    def result(self) -> dict[str, Any]:
        """The final ``type: result`` line."""
        results = [line for line in self.lines if line.get("type") == "result"]
        assert results, f"no result line (rc={self.returncode}):\n{self.stdout}\n{self.stderr}"
        return results[-1]

    @property
    def init(self) -> dict[str, Any]:
        """The ``system/init`` line."""
        return next(
            line
            for line in self.lines
            if line.get("type") == "system" and line.get("subtype") == "init"
        )

    def of_type(self, type_: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("type") == type_]


def parse_stream(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip().startswith("{")]


def run_claude(
    base_url: str,
    home: Path,
    cwd: Path,
    prompt: str,
    *extra: str,
    permission_mode: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 60,
    binary: str | None = None,
) -> ClaudeRun:
    """Run the real CLI once (stdin closed) and parse its stream-json output."""
    args = claude_args(binary or require_claude(), prompt, *extra, permission_mode=permission_mode)
    proc = subprocess.run(
        args,
        cwd=cwd,
        env=claude_env(base_url, home, env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return ClaudeRun(proc.returncode, parse_stream(proc.stdout), proc.stdout, proc.stderr)


def sanitize(text: str, replacements: Sequence[tuple[str, str]]) -> str:
    """Replace each absolute tmp path with a stable one (longest first) for saved samples."""
    for old, new in sorted(replacements, key=lambda pair: -len(pair[0])):
        text = text.replace(old, new)
    return text

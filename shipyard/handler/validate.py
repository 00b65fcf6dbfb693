"""VALIDATE: the handler checks the deliverables itself; it does not take the builder's word."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shipyard.handler.process import BuilderProcess

OUTPUT_KEEP = 16_000  # characters of the validation command's output kept in the event


@dataclass
class Verdict:
    passed: bool
    missing: list[str] = field(default_factory=list)
    command: str = ""
    exit_code: int | None = None
    output: str = ""

    def describe(self) -> str:
        parts = []
        if self.missing:
            parts.append("missing: " + ", ".join(self.missing))
        if self.command:
            status = "timed out" if self.exit_code is None else f"exited {self.exit_code}"
            parts.append(f"`{self.command}` {status}")
        return "; ".join(parts) or "all deliverables present"


def missing_files(workdir: Path, files: list[str]) -> list[str]:
    wanted = list(dict.fromkeys([*files, "README.md"]))
    missing = []
    for name in wanted:
        path = (workdir / name).resolve()
        if workdir not in path.parents and path != workdir:
            missing.append(f"{name} (outside the working directory)")
        elif not path.exists():
            missing.append(name)
    return missing


async def check(
    workdir: Path,
    files: list[str],
    command: str,
    *,
    env: Mapping[str, str],
    timeout: float,
    grace: float,
    on_line: Callable[[str], None] | None = None,
) -> Verdict:
    """Files named in Deliverables (README.md always) must exist; the validation command, if
    any, must exit 0 within ``timeout``."""
    missing = missing_files(workdir, files)
    if not command:
        return Verdict(passed=not missing, missing=missing)
    # The validation command is the dispatcher's own shell line (it may use && or pipes);
    # the prompt never goes through a shell.
    proc = BuilderProcess(["/bin/sh", "-c", command], cwd=workdir, env=dict(env), grace=grace)
    lines: list[str] = []
    await proc.start()

    async def read() -> None:
        async for line in proc.lines():
            lines.append(line)
            if on_line:
                on_line(line)

    code: int | None
    try:
        await asyncio.wait_for(read(), timeout)
        code = await proc.wait()
    except TimeoutError:
        await proc.kill()
        code = None
        lines.append(f"(killed: no result within {timeout:.0f}s)")
    output = "\n".join([*lines, *proc.stderr_tail])
    if len(output) > OUTPUT_KEEP:
        output = "…" + output[-OUTPUT_KEEP:]
    return Verdict(
        passed=not missing and code == 0,
        missing=missing,
        command=command,
        exit_code=code,
        output=output,
    )

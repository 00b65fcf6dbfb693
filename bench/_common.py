"""What every benchmark shares: figures and their verdicts, percentiles, progress on stderr,
CPU and memory readings from ``/proc``, a fresh embedded server, ``shipyard up`` as a child
process, and the command line (``--quick``, ``--json``, ``--dir``) that prints one table."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import json
import math
import os
import platform
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from shipyard.embedded import EmbeddedNats, binary

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: a child must not dlopen after fork


class BenchError(Exception):
    """The benchmark could not measure: a process did not start, events never arrived…"""


@dataclass
class Figure:
    """One line of the table. ``ratio`` is value / baseline; ``passed`` is None when the
    figure has no target."""

    name: str
    unit: str
    value: float
    baseline: float | None = None
    ratio: float | None = None
    target: str = ""
    passed: bool | None = None
    baseline_unit: str = ""  # when the baseline counts something else (msg/s against ev/s)


def at_least_ratio(
    name: str, unit: str, value: float, baseline: float, target: float, baseline_unit: str = ""
) -> Figure:
    ratio = value / baseline if baseline else 0.0
    verdict = f"ratio ≥ {target:g}"
    return Figure(name, unit, value, baseline, ratio, verdict, ratio >= target, baseline_unit)


def at_most(
    name: str, unit: str, value: float, limit: float | None, baseline: float | None = None
) -> Figure:
    ratio = value / baseline if baseline else None
    if limit is None:
        return Figure(name, unit, value, baseline, ratio)
    shown = f"{limit:g} {unit}" if unit not in ("", "events") else f"{limit:g}"
    target = f"= {shown}" if limit == 0 else f"≤ {shown}"
    return Figure(name, unit, value, baseline, ratio, target, value <= limit)


def latency(
    name: str, p: float, samples: Sequence[float], baseline: Sequence[float], limit: float | None
) -> Figure:
    """The ``p``-th percentile of ``samples`` (ms) against the same of ``baseline``."""
    base = percentile(baseline, p) if baseline else None
    return at_most(name, "ms", percentile(samples, p), limit, base)


def percentile(samples: Sequence[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(p / 100.0 * len(ordered)) - 1)]


def spread(samples: Sequence[float]) -> dict[str, float]:
    if not samples:
        return {}
    return {
        "p50": percentile(samples, 50),
        "p90": percentile(samples, 90),
        "p99": percentile(samples, 99),
        "max": max(samples),
        "mean": statistics.fmean(samples),
        "n": len(samples),
    }


def note(text: str) -> None:
    """Progress, on stderr so that stdout holds only the result."""
    print(text, file=sys.stderr, flush=True)


# --- /proc -------------------------------------------------------------------------------


def proc_cpu_seconds(pid: int, tid: int | None = None) -> float:
    """``utime + stime`` of one process (all its threads, not its children), or of one of
    its threads (the main thread's id is the pid)."""
    where = f"/proc/{pid}/task/{tid}/stat" if tid is not None else f"/proc/{pid}/stat"
    stat = Path(where).read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # fields[0] is field 3, "state"
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_cpu_seconds() -> float:
    """Busy CPU time of the whole machine, all cores."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def rss_mb(pid: int) -> float:
    """Resident memory of one process."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KB / 1024


def command_name(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def children(pid: int) -> list[int]:
    """A process's children, whichever of its threads started them (``shipyard up`` starts
    nats-server from a worker thread)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def environment() -> dict[str, Any]:
    try:
        server = subprocess.run(
            [binary(), "--version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        server = "unknown"
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    os_name = ""
    with contextlib.suppress(OSError):
        release = dict(
            line.split("=", 1)
            for line in Path("/etc/os-release").read_text().splitlines()
            if "=" in line
        )
        os_name = release.get("PRETTY_NAME", "").strip('"')
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "os": f"{os_name}, Linux {platform.release()}" if os_name else platform.platform(),
        "cpu": model,
        "cpus": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
        "nats_server": server,
        "nats_py": metadata.version("nats-py"),
        "duckdb": metadata.version("duckdb"),
    }


# --- processes ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def fresh_server(parent: str | None, prefix: str) -> AsyncIterator[tuple[Path, EmbeddedNats]]:
    """A temporary directory with an embedded nats-server running in it (``shipyard up``'s
    configuration: every write synced)."""
    with tempfile.TemporaryDirectory(prefix=f"shipyard-bench-{prefix}-", dir=parent) as tmp:
        async with serving(Path(tmp)) as server:
            yield Path(tmp), server


@contextlib.asynccontextmanager
async def serving(root: Path) -> AsyncIterator[EmbeddedNats]:
    """The embedded nats-server on the store under ``root``, running until the block ends."""
    server = EmbeddedNats(root / "nats")
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it if the bench dies, however it dies."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


DASHBOARD = re.compile(r"dashboard:\s+(http://\S+?)/\?token=(\S+)")


class ShipyardUp:
    """``shipyard up ARGS`` as a child process: started until a line of its stdout matches,
    stdout drained after that, stderr kept in a file."""

    def __init__(self, args: Sequence[str], root: Path, env: dict[str, str] | None = None):
        self.args = list(args)
        self.root = root
        self.env = env or {}
        self.stderr_path = root / "shipyard-up.stderr"
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""  # the dashboard's address and admin token, when it prints them
        self.token = ""
        self._drain: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def stderr_tail(self, lines: int = 20) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def warnings(self) -> list[str]:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return []
        return [line for line in text.splitlines() if " WARNING " in line or " ERROR " in line]

    async def start(self, ready: str, timeout: float = 60.0) -> None:
        """Start it and wait for a stdout line containing ``ready``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHIPYARD_")}
        env.update(self.env)
        with self.stderr_path.open("wb") as err:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                *("-m", "shipyard.cli", "up", *self.args),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                env=env,
                cwd=self.root,
                preexec_fn=_die_with_parent,
            )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            try:
                raw = await asyncio.wait_for(
                    self.proc.stdout.readline(), max(0.0, deadline - time.monotonic())
                )
            except TimeoutError:
                raw = b""
            if not raw:
                await self.stop()
                raise BenchError(
                    f"shipyard up did not come up; its last lines:\n{self.stderr_tail()}"
                )
            line = raw.decode(errors="replace")
            found = DASHBOARD.search(line)
            if found:
                self.url, self.token = found.group(1), found.group(2)
            if ready in line:
                break
        self._drain = asyncio.create_task(self._drain_stdout())

    async def _drain_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while await self.proc.stdout.readline():
            pass

    async def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (it stops its roles and exits), SIGKILL if it hangs."""
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                note("shipyard up did not stop in time; killing it")
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._drain is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._drain, 5)


# --- the command line --------------------------------------------------------------------


def number(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit == "%":
        return f"{value:.3f} %"
    if unit in ("events", "runs"):
        return f"{value:.0f}"
    if unit in ("MB", "s"):
        return f"{value:,.2f} {unit}" if value < 10 else f"{value:,.0f} {unit}"
    return f"{value:,.0f} {unit}" if unit else f"{value:.2f}"


def table(figures: Sequence[dict[str, Any]]) -> str:
    """figure, value, baseline, ratio, target, pass/miss: one line per figure."""
    headers = ("figure", "value", "baseline", "ratio", "target", "result")
    rows = [
        (
            f["name"],
            number(f["value"], f["unit"]),
            number(f["baseline"], f.get("baseline_unit") or f["unit"]),
            number(f["ratio"], ""),
            f["target"] or "—",
            {True: "pass", False: "MISS", None: "—"}[f["passed"]],
        )
        for f in figures
    ]
    widths = [max(len(str(r[i])) for r in (headers, *rows)) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        left = cells[0].ljust(widths[0])
        middle = [c.rjust(w) for c, w in zip(cells[1:4], widths[1:4], strict=True)]
        right = [c.ljust(w) for c, w in zip(cells[4:], widths[4:], strict=True)]
        return "  ".join([left, *middle, *right]).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


Measure = Callable[[bool, "str | None"], Awaitable[dict[str, Any]]]


def main(name: str, description: str, measure: Measure, argv: Sequence[str] | None) -> int:
    """``python -m bench.NAME [--quick] [--json] [--dir DIR]``. ``measure(quick, dir)``
    returns ``{"figures": [Figure…], "details": [lines…], …}``."""
    parser = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=description)
    parser.add_argument("--quick", action="store_true", help="a smoke run with small sizes")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--dir", help="where to create temporary stores (default: $TMPDIR)")
    args = parser.parse_args(argv)

    async def run() -> dict[str, Any]:
        # Clean up on SIGTERM as on Ctrl-C: every child process is stopped.
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return await measure(args.quick, args.dir)
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    started = time.perf_counter()
    try:
        result = asyncio.run(run())
    except BenchError as e:
        print(f"bench.{name}: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"bench.{name}: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    result["figures"] = [
        dataclasses.asdict(f) if isinstance(f, Figure) else f for f in result["figures"]
    ]
    result.update(name=name, quick=args.quick, seconds=round(time.perf_counter() - started, 1))
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False, default=str))
    else:
        print(table(result["figures"]))
        for line in result.get("details", []):
            print(line)
        print(f"\n({name}: {result['seconds']:.1f}s)")
    return 0

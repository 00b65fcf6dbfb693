"""The ``shipyard`` command."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
from nats.aio.client import Client as NATS

from shipyard import __version__, access, console, demo, instance, integrations, runtime
from shipyard import settings as settings_mod
from shipyard.errors import CommandRejected, ConfigError, NotRunning, ShipyardError
from shipyard.events import commands, rework, text
from shipyard.events.dispatch import MAX_DISPATCH_BYTES
from shipyard.events.envelope import aggregate_subject, valid_id
from shipyard.events.log import ALL_EVENTS, EventLog, connect
from shipyard.gateway import client
from shipyard.gateway.auth import Role, TokenStore
from shipyard.projections import replay
from shipyard.projections import service as query_service
from shipyard.settings import Settings

EXIT_OK = 0
EXIT_FAILED = 1  # the command ran and was refused, or failed
EXIT_USAGE = 2  # argparse's own code for a malformed command line


def _common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("where Shipyard runs")
    group.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="data directory (env SHIPYARD_DATA_DIR; default ~/.local/share/shipyard)",
    )
    group.add_argument(
        "--nats",
        metavar="URL[,URL...]",
        help="use these NATS servers instead of the embedded one (env SHIPYARD_NATS_URL)",
    )
    group.add_argument(
        "--nats-creds",
        metavar="FILE",
        help="NATS credentials file (JWT + NKey) for a secured server (env SHIPYARD_NATS_CREDS; "
        "or SHIPYARD_NATS_USER / SHIPYARD_NATS_PASSWORD, SHIPYARD_NATS_TOKEN)",
    )
    group.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="settings file (default <data dir>/shipyard.toml)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shipyard",
        description=(
            "Shipyard: a command center for autonomous agent operations. A dispatcher queues "
            "build tasks; handlers drive a builder through an 8-phase pipeline; every fact is "
            "an event in NATS JetStream."
        ),
    )
    parser.add_argument("--version", action="version", version=f"shipyard {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    up = sub.add_parser(
        "up",
        help="run Shipyard (starts the embedded NATS unless --nats is given)",
        description=(
            "Run Shipyard in the foreground until Ctrl-C. With no --nats, starts the "
            "nats-server that comes with Shipyard, on loopback, with its store under the data "
            "directory. Only one `up` may run per data directory."
        ),
    )
    _common(up)
    up.add_argument(
        "--roles",
        metavar="ROLE[,ROLE...]",
        help=f"roles to run in this process (default: all of {', '.join(runtime.ROLES)})",
    )
    up.set_defaults(func=cmd_up)

    dispatch = sub.add_parser(
        "dispatch",
        help="put a build task on the queue",
        description=(
            "Send a dispatch (the JSON of the dispatch protocol) and print the new task id. "
            "The prompt needs the sections ## Task, ## Requirements, ## Environment (with the "
            "working directory) and ## Deliverables (with README.md). On rejection every "
            "problem is listed and the exit status is 1."
        ),
    )
    _common(dispatch)
    dispatch.add_argument("file", metavar="FILE|-", help="the dispatch JSON file, or - for stdin")
    dispatch.add_argument("--json", action="store_true", help="print the whole task record as JSON")
    dispatch.set_defaults(func=cmd_dispatch)

    cancel = sub.add_parser(
        "cancel",
        help="cancel a queued or running task",
        description=(
            "Cancel a task. A queued or blocked task is cancelled at once; a running one's "
            "builder (its whole process group) is stopped by its handler within seconds."
        ),
    )
    _common(cancel)
    cancel.add_argument("task_id", metavar="ID", help="the task id (t-…)")
    cancel.add_argument("--reason", default="", help="why, for the record")
    cancel.set_defaults(func=cmd_cancel)

    retry = sub.add_parser(
        "retry",
        help="run a failed or cancelled task again",
        description="Queue a failed or cancelled task again as a new attempt, keeping its history.",
    )
    _common(retry)
    retry.add_argument("task_id", metavar="ID", help="the task id (t-…)")
    retry.set_defaults(func=cmd_retry)

    escalate = sub.add_parser(
        "escalate",
        help="hand a failed task to another agent",
        description=(
            "Make a new task from a failed or cancelled one, for another agent. Its builder is "
            "told what went wrong: the attempts, errors, validation output and the tail of the "
            "builder's log. A task is escalated once; to go further, escalate the new task."
        ),
    )
    _common(escalate)
    escalate.add_argument("task_id", metavar="ID", help="the failed task's id (t-…)")
    escalate.add_argument("--to", required=True, metavar="AGENT", help="the agent to hand it to")
    escalate.add_argument("--note", default="", help="a note for the next builder")
    escalate.set_defaults(func=cmd_escalate)

    rework = sub.add_parser(
        "rework",
        help="write a Fix: dispatch from a failed run, to edit and send",
        description=(
            "Print the dispatch protocol's rework request (titled `Fix: …`) for a failed run, "
            "with Current State (Broken) filled in from the run: the phase it failed in, the "
            "reason, the error, the failed validation and the builder's last output. Edit it, "
            "then send it with `shipyard dispatch FILE`."
        ),
    )
    _common(rework)
    rework.add_argument(
        "run_id", metavar="RUN_ID|TASK_ID", help="the failed run (r-…), or a task for its last run"
    )
    rework.add_argument(
        "-o", "--output", type=Path, metavar="FILE", help="write it to FILE instead of stdout"
    )
    rework.set_defaults(func=cmd_rework)

    status = sub.add_parser(
        "status",
        help="what is running, queued and stale right now",
        description="Show the queue, running builds with phase and percent, and STALE runs.",
    )
    _common(status)
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument(
        "--fresh", action="store_true", help="wait until the read models include every event"
    )
    status.set_defaults(func=cmd_status)

    hist = sub.add_parser(
        "history",
        help="Build History: finished runs, newest first",
        description="Finished runs with their eight phase results, duration, turns and cost.",
    )
    _common(hist)
    hist.add_argument("--limit", type=int, default=20, help="rows per page (default 20)")
    hist.add_argument("--before", default="", metavar="RUN_ID", help="the page after this run")
    hist.add_argument(
        "--outcome", default="", choices=["", "succeeded", "failed", "cancelled"], help="filter"
    )
    hist.add_argument("--agent", default="", help="only runs of this agent")
    hist.add_argument("--search", default="", help="title text or task id")
    hist.add_argument("--json", action="store_true", help="print JSON")
    hist.add_argument(
        "--fresh", action="store_true", help="wait until the read models include every event"
    )
    hist.set_defaults(func=cmd_history)

    audit = sub.add_parser(
        "audit",
        help="a task's complete history, phase by phase",
        description="Every event of a task — actor, time, phase by phase — from the event log.",
    )
    _common(audit)
    audit.add_argument("task_id", metavar="ID", help="the task id (t-…)")
    fmt = audit.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON document")
    fmt.add_argument("--jsonl", action="store_true", help="one JSON event per line")
    audit.set_defaults(func=cmd_audit)

    replay = sub.add_parser(
        "replay",
        help="rebuild the read models from the event log",
        description=(
            "Rebuild every read model from sequence 1 into a fresh database and swap it in "
            "(Shipyard must be stopped). --verify rebuilds beside the live one instead, prints "
            "a digest per table and exits 1 on any difference (works while Shipyard runs)."
        ),
    )
    _common(replay)
    replay.add_argument("--verify", action="store_true", help="compare, do not replace")
    replay.set_defaults(func=cmd_replay)

    send = sub.add_parser(
        "send",
        help="send a message to another agent",
        description=(
            "Send a message (comment, question, status_request, status_response or directive) "
            "from one agent to another, or to everyone with --to '*'."
        ),
    )
    _common(send)
    send.add_argument("--from", dest="sender", required=True, metavar="AGENT", help="who sends")
    send.add_argument("--to", dest="recipient", required=True, metavar="AGENT", help="to whom")
    send.add_argument(
        "--type",
        default="comment",
        choices=["comment", "question", "status_request", "status_response", "directive"],
        help="the kind of message (default comment)",
    )
    send.add_argument("body", metavar="TEXT", help="the message")
    send.add_argument("--thread", default="", metavar="ID", help="continue this thread")
    send.add_argument("--reply-to", default="", metavar="MESSAGE_ID", help="answer this message")
    send.add_argument("--task", default="", metavar="ID", help="the task it is about")
    send.add_argument(
        "--priority", default="normal", choices=["low", "normal", "high", "urgent"], help="urgency"
    )
    send.set_defaults(func=cmd_send)

    inbox = sub.add_parser(
        "inbox",
        help="an agent's messages",
        description="Messages to an agent (and to everyone), oldest first.",
    )
    _common(inbox)
    inbox.add_argument("--agent", required=True, metavar="AGENT", help="whose inbox")
    inbox.add_argument("--unread", action="store_true", help="only unread messages")
    inbox.add_argument("--mark-read", action="store_true", help="mark what is shown as read")
    inbox.add_argument("--json", action="store_true", help="print JSON")
    inbox.add_argument(
        "--hook",
        action="store_true",
        help=(
            "for Claude Code's SessionStart hook: print the unread messages as the session's "
            "extra context, mark them read, and never fail the session"
        ),
    )
    inbox.set_defaults(func=cmd_inbox)

    thread = sub.add_parser(
        "thread", help="a whole thread", description="Every message of a thread, with receipts."
    )
    _common(thread)
    thread.add_argument("thread_id", metavar="ID", help="the thread id (th-…)")
    thread.add_argument("--json", action="store_true", help="print JSON")
    thread.set_defaults(func=cmd_thread)

    demo_cmd = sub.add_parser(
        "demo",
        help="watch Shipyard build sample tasks, no API key needed",
        description=(
            "Dispatch sample tasks to the built-in demo builder — a sequential pair, a parallel "
            "group, one that heals and one that fails — and print the dashboard link. Uses the "
            "running Shipyard, or starts one (Ctrl-C stops it)."
        ),
    )
    _common(demo_cmd)
    demo_cmd.set_defaults(func=cmd_demo)

    init = sub.add_parser(
        "init",
        help="set up an agent to work with Shipyard (claude, openclaw)",
        description="Write what an agent needs to know Shipyard, merged into what is there.",
    )
    init_sub = init.add_subparsers(dest="init_command", metavar="AGENT", required=True)
    claude = init_sub.add_parser(
        "claude",
        help="CLAUDE.md block, SessionStart inbox hook and MCP server for a project",
        description=(
            "Write into a project: a CLAUDE.md block on the dispatch protocol and comms, a "
            "SessionStart hook in .claude/settings.json that puts unread messages into each "
            "session (merged, never clobbering), and the `shipyard mcp` server in .mcp.json. "
            "The agent's token is kept in the data directory, not in the project."
        ),
    )
    _common(claude)
    claude.add_argument("dir", nargs="?", type=Path, default=Path("."), metavar="DIR")
    claude.add_argument("--agent", default="claude", help="the agent's name (default claude)")
    claude.add_argument(
        "--dispatcher",
        action="store_true",
        help="give it a dispatcher token (may dispatch and escalate), not a builder's",
    )
    claude.add_argument("--new-token", action="store_true", help="replace its saved token")
    claude.set_defaults(func=cmd_init_claude)
    openclaw = init_sub.add_parser(
        "openclaw",
        help="an OpenClaw skill that dispatches to Shipyard",
        description=(
            "Write the `shipyard` AgentSkills folder (SKILL.md) that teaches OpenClaw to "
            "dispatch with the four sections, check status, answer its inbox and escalate."
        ),
    )
    _common(openclaw)
    openclaw.add_argument(
        "dir",
        nargs="?",
        type=Path,
        default=None,
        metavar="DIR",
        help="skills directory (default ~/.openclaw/skills)",
    )
    openclaw.add_argument(
        "--dispatcher", default="openclaw", help="the name it dispatches as (default openclaw)"
    )
    openclaw.set_defaults(func=cmd_init_openclaw)

    mcp = sub.add_parser(
        "mcp",
        help="an MCP server on stdio for an agent (messages, inbox, status, dispatch)",
        description=(
            "Serve the Model Context Protocol on stdin/stdout with tools to send a message, "
            "read the inbox, reply, check a task and — with a dispatcher token — dispatch and "
            "escalate. It talks to the gateway with SHIPYARD_URL and SHIPYARD_TOKEN, else the "
            "running instance and the token `shipyard init claude` saved."
        ),
    )
    _common(mcp)
    mcp.add_argument(
        "--agent", default="", help="who it speaks for (default $SHIPYARD_AGENT, else claude)"
    )
    mcp.set_defaults(func=cmd_mcp)

    token = sub.add_parser(
        "token",
        help="make API tokens",
        description="Make a bearer token for the HTTP API and dashboard, with a role.",
    )
    token_sub = token.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    create = token_sub.add_parser(
        "create",
        help="make a token and print it",
        description=(
            "Print a new token. Roles: admin (everything), dispatcher (dispatch, cancel, retry, "
            "messages), builder (its own messages), viewer (read only)."
        ),
    )
    _common(create)
    create.add_argument(
        "--role", required=True, choices=["admin", "dispatcher", "builder", "viewer"]
    )
    create.add_argument("--name", default="", help="who it is for (a builder: its agent name)")
    create.set_defaults(func=cmd_token_create)

    nats_user = sub.add_parser(
        "nats-user",
        help="print a role's NATS user for the embedded server",
        description=(
            "Print SHIPYARD_NATS_URL, SHIPYARD_NATS_USER and SHIPYARD_NATS_PASSWORD for one "
            "role's user on the running embedded nats-server, as lines for a shell or an env "
            "file. Roles: service (handlers and other roles run elsewhere), admin, dispatcher "
            "(dispatch, cancel, retry, messages), viewer (read only), builder (one agent's own "
            "messages; needs --agent). The URL changes at every start; the password does not."
        ),
    )
    _common(nats_user)
    nats_user.add_argument("role", choices=list(access.ROLES))
    nats_user.add_argument("--agent", default="", help="the builder's agent")
    nats_user.set_defaults(func=cmd_nats_user)

    events = sub.add_parser(
        "events",
        help="print the event log as an audit trail",
        description="Print recorded events, oldest first; --follow keeps printing new ones.",
    )
    _common(events)
    events.add_argument("--task", metavar="ID", help="only this task's events")
    events.add_argument("--type", metavar="TYPE", help="only events of this type")
    events.add_argument(
        "--from", dest="start", type=int, default=1, metavar="SEQ", help="start at this sequence"
    )
    events.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    events.add_argument("--json", action="store_true", help="one JSON object per line")
    events.set_defaults(func=cmd_events)

    bench = sub.add_parser(
        "bench",
        help="run the benchmark suite (from a clone of the repository)",
        description="Run `python -m bench [NAME…] [--quick] [--json]`: every figure beside the "
        "raw baseline measured in the same run. Needs the repository's bench/ package.",
    )
    _common(bench)
    bench.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (all)")
    bench.add_argument("--quick", action="store_true", help="smoke-run sizes (for CI)")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.add_argument("--dir", help="where to create temporary stores")
    bench.set_defaults(func=cmd_bench)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    return settings_mod.load(
        config_file=args.config,
        data_dir=args.data_dir,
        nats_url=args.nats,
        nats_creds=getattr(args, "nats_creds", None),
    )


async def _connect(cfg: Settings) -> NATS:
    urls = cfg.nats_url
    if not urls:
        info = instance.read_info(cfg.data_dir)
        if info is None:
            raise NotRunning(
                f"no Shipyard is running on {cfg.data_dir}: start it with `shipyard up` "
                "(or pass --nats URL, or --data-dir of the running one)"
            )
        urls = list(info["nats_url"])
    return await connect(urls, name="shipyard-cli", credentials=access.credentials_for(cfg))


def _with_nats(args: argparse.Namespace, body: Callable[[NATS], Awaitable[int]]) -> int:
    async def main() -> int:
        nc = await _connect(_settings(args))
        try:
            return await body(nc)
        finally:
            await nc.close()

    return asyncio.run(main())


def cmd_up(args: argparse.Namespace) -> int:
    cfg = _settings(args)
    roles = runtime.parse_roles(args.roles)

    def ready(info: dict[str, Any]) -> None:
        where = "embedded nats-server" if info["embedded"] else "NATS"
        print(f"Shipyard {__version__} is up ({', '.join(info['roles'])})", flush=True)
        print(f"  {where}: {', '.join(info['nats_url'])}", flush=True)
        print(f"  data:      {cfg.data_dir}", flush=True)
        if info.get("dashboard"):
            print(f"  dashboard: {info['dashboard']}", flush=True)
        if info.get("telegram_chats"):
            print(f"  telegram:  alerts to {info['telegram_chats']} chat(s)", flush=True)
        print("  dispatch:  shipyard dispatch task.json   (Ctrl-C stops)", flush=True)

    asyncio.run(runtime.run(cfg, roles, on_ready=ready))
    print("Shipyard stopped.", flush=True)
    return EXIT_OK


def _read_input(name: str) -> bytes:
    if name == "-":
        data = sys.stdin.buffer.read(MAX_DISPATCH_BYTES + 1)
    else:
        path = Path(name)
        try:
            with path.open("rb") as f:
                data = f.read(MAX_DISPATCH_BYTES + 1)
        except OSError as e:
            raise ShipyardError(f"cannot read {name}: {e.strerror or e}") from e
    return data


def cmd_dispatch(args: argparse.Namespace) -> int:
    body = _read_input(args.file)

    async def send(nc: NATS) -> int:
        result = await commands.call(nc, "dispatch", body)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            note = "  (already dispatched with this idempotency key)" if result["duplicate"] else ""
            print(f"{result['task_id']}{note}")
        return EXIT_OK

    return _with_nats(args, send)


def cmd_cancel(args: argparse.Namespace) -> int:
    async def send(nc: NATS) -> int:
        body = {"task_id": args.task_id, "reason": args.reason}
        result = await commands.call(nc, "cancel", body, actor="cli")
        print(f"{result['task_id']} {result['state']}")
        return EXIT_OK

    return _with_nats(args, send)


def cmd_retry(args: argparse.Namespace) -> int:
    async def send(nc: NATS) -> int:
        result = await commands.call(nc, "retry", {"task_id": args.task_id}, actor="cli")
        print(f"{result['task_id']} queued as attempt {result['attempt']}")
        return EXIT_OK

    return _with_nats(args, send)


def cmd_escalate(args: argparse.Namespace) -> int:
    async def send(nc: NATS) -> int:
        body = {"task_id": args.task_id, "to": args.to, "note": args.note}
        result = await commands.call(nc, "escalate", body, actor="cli")
        print(f"{result['task_id']} escalated to {result['agent']} as {result['escalated_to']}")
        return EXIT_OK

    return _with_nats(args, send)


async def _dispatch_demo(nc: NATS, root: Path) -> list[str]:
    ids: dict[str, str] = {}
    for item in demo.tasks(root):
        body = dict(item["body"])
        if "after" in body:
            body["after"] = [ids[key] for key in body["after"]]
        result = await commands.call(nc, "dispatch", body, actor="demo")
        ids[item["key"]] = result["task_id"]
        print(f"  dispatched {result['task_id']}  {body['action_name']}", flush=True)
    return list(ids.values())


def cmd_demo(args: argparse.Namespace) -> int:
    cfg = _settings(args)
    root = cfg.data_dir / "demo"
    running = instance.read_info(cfg.data_dir)
    if running is not None or cfg.nats_url:

        async def send(nc: NATS) -> int:
            print("Dispatching the demo tasks to the running Shipyard:")
            await _dispatch_demo(nc, root)
            if running and running.get("dashboard"):
                print(f"Watch them: {running['dashboard']}")
            return EXIT_OK

        return _with_nats(args, send)

    def ready(info: dict[str, Any]) -> None:
        print(f"Shipyard {__version__} is up for the demo.", flush=True)
        if info.get("dashboard"):
            print(f"  Open the dashboard: {info['dashboard']}", flush=True)

    async def then(nc: NATS) -> None:
        await _dispatch_demo(nc, root)
        print("Watch all eight phases on the dashboard. Ctrl-C stops Shipyard.", flush=True)

    asyncio.run(runtime.run(cfg, runtime.DEFAULT_ROLES, on_ready=ready, then=then))
    print("Shipyard stopped.", flush=True)
    return EXIT_OK


def _show(done: integrations.Written) -> None:
    for path, what in done.files:
        print(f"  {path}: {what}")
    for note in done.notes:
        print(f"  {note}")


def cmd_init_claude(args: argparse.Namespace) -> int:
    cfg = _settings(args)
    if not valid_id(args.agent):
        raise ShipyardError(f"{args.agent!r} is not an agent name (letters, digits, - and _)")
    role: Role = "dispatcher" if args.dispatcher else "builder"
    done = integrations.init_claude(
        args.dir.resolve(), agent=args.agent, data_dir=cfg.data_dir, role=role, renew=args.new_token
    )
    print(f"Claude Code in {args.dir.resolve()} now works with Shipyard as {args.agent}:")
    _show(done)
    return EXIT_OK


def cmd_init_openclaw(args: argparse.Namespace) -> int:
    cfg = _settings(args)
    if not valid_id(args.dispatcher):
        raise ShipyardError(f"{args.dispatcher!r} is not a name (letters, digits, - and _)")
    where = (args.dir or integrations.default_skills_dir()).expanduser().resolve()
    done = integrations.init_openclaw(where, dispatcher=args.dispatcher, data_dir=cfg.data_dir)
    print(f"OpenClaw skill written for dispatcher {args.dispatcher}:")
    _show(done)
    return EXIT_OK


def cmd_mcp(args: argparse.Namespace) -> int:
    cfg = _settings(args)
    agent = args.agent or os.environ.get("SHIPYARD_AGENT", "") or "claude"
    if not valid_id(agent):
        raise ShipyardError(f"{agent!r} is not an agent name (letters, digits, - and _)")
    url, token = client.locate(cfg.data_dir, agent)
    from shipyard.gateway import mcp  # the MCP library is slow to import: only when needed

    asyncio.run(mcp.serve(client.Api(url, token), agent))
    return EXIT_OK


def cmd_token_create(args: argparse.Namespace) -> int:
    cfg = _settings(args)
    token = TokenStore(cfg.data_dir).create(args.role, args.name or args.role)
    print(token)
    return EXIT_OK


def cmd_nats_user(args: argparse.Namespace) -> int:
    cfg = _settings(args)
    if not cfg.embedded:
        raise ConfigError(
            "--nats names a server of your own: its users are in its own configuration"
        )
    info = instance.read_info(cfg.data_dir)
    if info is None or not info.get("embedded"):
        raise NotRunning(
            f"no Shipyard with the embedded nats-server runs on {cfg.data_dir}: start it with "
            "`shipyard up` (the server's address changes at every start)"
        )
    if (args.role == "builder") != bool(args.agent):
        raise ConfigError("--agent goes with the builder role, and only with it")
    users = access.Users.load(access.nats_dir(cfg.data_dir))
    creds = users.credentials(args.role, args.agent)
    print(f"SHIPYARD_NATS_URL={','.join(info['nats_url'])}")
    print(f"SHIPYARD_NATS_USER={creds.user}")
    print(f"SHIPYARD_NATS_PASSWORD={creds.password}")
    return EXIT_OK


def cmd_send(args: argparse.Namespace) -> int:
    async def go(nc: NATS) -> int:
        body = {
            "sender": args.sender,
            "recipient": args.recipient,
            "type": args.type,
            "body": args.body,
            "priority": args.priority,
            "thread_id": args.thread,
            "reply_to": args.reply_to,
            "task_id": args.task,
        }
        result = await commands.call(
            nc, "send", body, subject=commands.scoped_subject("send", args.sender)
        )
        print(f"{result['message_id']} in thread {result['thread_id']}")
        return EXIT_OK

    return _with_nats(args, go)


def cmd_inbox(args: argparse.Namespace) -> int:
    if args.hook:
        return _inbox_hook(args)

    async def go(nc: NATS) -> int:
        ask = {"agent": args.agent, "unread": args.unread, **await _freshness(nc, True)}
        result = await query_service.ask(nc, "inbox", ask)
        messages = result["messages"]
        if args.mark_read:
            by_thread: dict[str, list[str]] = {}
            for m in messages:
                if not m["read"]:
                    by_thread.setdefault(m["thread_id"], []).append(m["message_id"])
            for thread_id, ids in by_thread.items():
                await commands.call(
                    nc,
                    "mark_read",
                    {"reader": args.agent, "thread_id": thread_id, "message_ids": ids},
                    subject=commands.scoped_subject("mark_read", args.agent),
                )
        if args.json:
            _print_json(result)
        else:
            print(console.inbox(args.agent, result))
        return EXIT_OK

    return _with_nats(args, go)


def _inbox_hook(args: argparse.Namespace) -> int:
    """Claude Code adds ``additionalContext`` to the session. Whatever goes wrong here, the
    session must still start: problems go to stderr and the exit status stays 0."""

    async def go(nc: NATS) -> int:
        ask = {"agent": args.agent, "unread": True, **await _freshness(nc, True)}
        result = await query_service.ask(nc, "inbox", ask)
        messages = [m for m in result["messages"] if not m["read"]]
        if not messages:
            return EXIT_OK
        by_thread: dict[str, list[str]] = {}
        for m in messages:
            by_thread.setdefault(m["thread_id"], []).append(m["message_id"])
        for thread_id, ids in by_thread.items():
            body = {"reader": args.agent, "thread_id": thread_id, "message_ids": ids}
            await commands.call(
                nc, "mark_read", body, subject=commands.scoped_subject("mark_read", args.agent)
            )
        context = console.inbox_context(args.agent, messages)
        hook = {"hookEventName": "SessionStart", "additionalContext": context}
        print(json.dumps({"hookSpecificOutput": hook}))
        return EXIT_OK

    try:
        return _with_nats(args, go)
    except Exception as e:  # a hook must never stop the session
        print(f"shipyard inbox --hook: {e}", file=sys.stderr)
        return EXIT_OK


def cmd_thread(args: argparse.Namespace) -> int:
    async def go(nc: NATS) -> int:
        ask = {"thread_id": args.thread_id, **await _freshness(nc, True)}
        messages = await query_service.ask(nc, "thread", ask)
        if args.json:
            _print_json(messages)
        else:
            print(console.thread(messages))
        return EXIT_OK

    return _with_nats(args, go)


def cmd_bench(args: argparse.Namespace) -> int:
    clone = Path.cwd()
    if (clone / "bench" / "__main__.py").is_file() and str(clone) not in sys.path:
        sys.path.insert(0, str(clone))  # the console script does not look in the cwd
    try:
        suite = importlib.import_module("bench.__main__")
    except ModuleNotFoundError as e:
        raise ConfigError(
            "the benchmarks are not part of an installed Shipyard: they live in bench/ of the "
            "repository. Run `shipyard bench` (or `python -m bench`) from a clone, installed "
            "with `pip install -e .`."
        ) from e
    argv = [*args.names, *(["--quick"] if args.quick else []), *(["--json"] if args.json else [])]
    code: int = suite.main(argv + (["--dir", args.dir] if args.dir else []))
    return code


def cmd_events(args: argparse.Namespace) -> int:
    if args.task and not valid_id(args.task):
        raise ShipyardError(f"{args.task!r} is not a task id")
    subject = aggregate_subject("task", args.task) if args.task else ALL_EVENTS

    async def show(nc: NATS) -> int:
        log = EventLog(nc)
        stream = (
            log.follow(subject=subject, start=args.start)
            if args.follow
            else log.read(subject=subject, start=args.start, stop=None)
        )
        async for event in stream:
            if args.type and event.type != args.type:
                continue
            if args.json:
                sys.stdout.write(msgspec.json.encode(event).decode() + "\n")
            else:
                sys.stdout.write(text.line(event) + "\n")
            sys.stdout.flush()
        return EXIT_OK

    return _with_nats(args, show)


def _print_json(value: Any) -> None:
    print(msgspec.json.format(msgspec.json.encode(value)).decode())


async def _freshness(nc: NATS, fresh: bool) -> dict[str, int]:
    """With --fresh, ask the query to wait until the projection has the log's last event."""
    return {"min_seq": await EventLog(nc).stream_last_seq()} if fresh else {}


def cmd_status(args: argparse.Namespace) -> int:
    async def show(nc: NATS) -> int:
        result = await query_service.ask(nc, "status", await _freshness(nc, args.fresh))
        if args.json:
            _print_json(result)
        else:
            print(console.status(result))
        return EXIT_OK

    return _with_nats(args, show)


def cmd_history(args: argparse.Namespace) -> int:
    async def show(nc: NATS) -> int:
        page = await query_service.ask(
            nc,
            "history",
            {
                "limit": args.limit,
                "before": args.before,
                "outcome": args.outcome,
                "agent": args.agent,
                "search": args.search,
                **await _freshness(nc, args.fresh),
            },
        )
        if args.json:
            _print_json(page)
        else:
            print(console.history(page))
        return EXIT_OK

    return _with_nats(args, show)


def cmd_audit(args: argparse.Namespace) -> int:
    if not valid_id(args.task_id):
        raise ShipyardError(f"{args.task_id!r} is not a task id")

    async def show(nc: NATS) -> int:
        trail = await EventLog(nc).history("task", args.task_id)
        if not trail:
            raise ShipyardError(f"no task {args.task_id} in the event log")
        if args.jsonl:
            for event in trail:
                sys.stdout.write(msgspec.json.encode(event).decode() + "\n")
        elif args.json:
            _print_json({"task_id": args.task_id, "events": trail})
        else:
            print(console.audit(args.task_id, trail))
        return EXIT_OK

    return _with_nats(args, show)


def cmd_rework(args: argparse.Namespace) -> int:
    ident = args.run_id
    if not valid_id(ident):
        raise ShipyardError(f"{ident!r} is not a run id (r-…) or task id (t-…)")

    async def write(nc: NATS) -> int:
        if ident.startswith("t-"):
            task_id, run_id = ident, ""
        else:
            found = await query_service.ask(nc, "run", {"run_id": ident})
            task_id, run_id = found["task_id"], ident
        trail = await EventLog(nc).history("task", task_id)
        if not trail:
            raise ShipyardError(f"no task {task_id} in the event log")
        body = json.dumps(rework.fix_dispatch(trail, run_id), indent=2, ensure_ascii=False)
        if args.output:
            args.output.write_text(body + "\n", encoding="utf-8")
            print(f"wrote {args.output}; edit it, then: shipyard dispatch {args.output}")
        else:
            print(body)
        return EXIT_OK

    return _with_nats(args, write)


def cmd_replay(args: argparse.Namespace) -> int:
    cfg = _settings(args)
    return asyncio.run(replay.run(cfg, verify=args.verify, out=print))


def _report(error: ShipyardError) -> None:
    print(f"shipyard: {error}", file=sys.stderr)
    if (
        isinstance(error, CommandRejected)
        and error.template
        and any(p.startswith("payload.prompt") for p in error.problems)
    ):
        print("\nA dispatch prompt follows this form:\n", file=sys.stderr)
        print(error.template, file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        code: int = args.func(args)
    except ShipyardError as e:
        _report(e)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK
    return code


if __name__ == "__main__":
    sys.exit(main())

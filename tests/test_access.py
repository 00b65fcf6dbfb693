"""Least privilege on NATS: the embedded server runs with one user per role, and each may do
its work and nothing else — checked against a real `shipyard up` and its real nats-server,
by trying what each role must not do."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS

from shipyard import access
from shipyard.access import Credentials, Users
from shipyard.embedded import EmbeddedNats
from shipyard.errors import CommandRejected, ConnectionFailed
from shipyard.events import commands
from shipyard.events import types as t
from shipyard.events.envelope import encode, make
from shipyard.events.log import EventLog, connect
from shipyard.projections.service import ask
from tests.conftest import Up
from tests.operator_mode import OperatorNats
from tests.samples import dispatch_body

AGENT = "coder.one"  # a dot: agent names may hold one, subject tokens may not


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    """`shipyard up` without a handler (dispatched tasks stay queued), with one agent."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "shipyard.toml").write_text(
        f'[agents."{AGENT}"]\nkind = "command"\ncommand = ["true"]\n'
    )
    running = Up(data, "--roles", "commands,projector,gateway")
    running.wait_ready()
    yield running
    running.stop()


class Raw:
    """A plain nats-py connection as one user, collecting what the server refuses."""

    def __init__(self) -> None:
        self.refused: asyncio.Queue[str] = asyncio.Queue()
        self.nc: NATS | None = None

    async def open(self, up: Up, role: access.Role, agent: str = "") -> NATS:
        creds = Users.load(access.nats_dir(up.data_dir)).credentials(role, agent)
        info = json.loads((up.data_dir / "instance.json").read_text())

        async def on_error(e: Exception) -> None:
            await self.refused.put(str(e))

        self.nc = await nats.connect(
            info["nats_url"], error_cb=on_error, allow_reconnect=False, **creds.connect_options()
        )
        return self.nc

    async def expect_refusal(self, what: str) -> None:
        """Wait for the server to refuse ``what`` (a subject, which nats-py reports in lower
        case), and say so."""
        message = await asyncio.wait_for(self.refused.get(), 10)
        assert "permissions violation" in message and f'"{what.lower()}"' in message, message


@pytest.fixture
async def raw() -> AsyncIterator[Raw]:
    conn = Raw()
    yield conn
    if conn.nc is not None:
        await conn.nc.close()


async def test_a_builder_cannot_append_a_phase_heartbeat_or_kanban_event(up: Up, raw: Raw) -> None:
    """With its own NATS user, a builder publishing a phase change, a heartbeat, a Kanban
    card move or a finish straight onto the event log's subjects is refused by the server, as
    is every JetStream call that would change or read the stream, and listening to the log or
    to others' replies; none of those events is in the log afterwards. The same events sent by
    the service user do land, so the attempts were well formed."""
    admin = await up.connect("admin")
    dispatcher = await up.connect("dispatcher")
    try:
        task_id = (await commands.call(dispatcher, "dispatch", dispatch_body()))["task_id"]
        run_id = "r-forged"
        forged = [
            make(
                t.PhaseChanged(run_id=run_id, phase=t.Phase.BUILD, status=t.PhaseStatus.SUCCEEDED),
                aggregate_id=task_id,
                actor="builder",
            ),
            make(
                t.WorkProgress(run_id=run_id, phase=t.Phase.BUILD, percent=100),
                aggregate_id=task_id,
                actor="builder",
            ),
            make(
                t.CardMoved(run_id=run_id, card_id="c1", column="done"),
                aggregate_id=task_id,
                actor="builder",
            ),
            make(
                t.TaskFinished(outcome=t.TaskState.SUCCEEDED, reason="forged"),
                aggregate_id=task_id,
                actor="builder",
            ),
        ]
        builder = await raw.open(up, "builder", AGENT)
        for event in forged:
            await builder.publish(event.subject, encode(event), headers={"Nats-Msg-Id": event.id})
            await raw.expect_refusal(event.subject)
        for api in (
            "$JS.API.STREAM.PURGE.SHIPYARD",
            "$JS.API.STREAM.DELETE.SHIPYARD",
            "$JS.API.STREAM.UPDATE.SHIPYARD",
            "$JS.API.STREAM.MSG.DELETE.SHIPYARD",
            "$JS.API.CONSUMER.CREATE.SHIPYARD",
            "sy.cmd.dispatch",
            "sy.cmd.cancel",
            "sy.cmd.send",
            "sy.qry.inbox",
        ):
            await builder.publish(api, b"{}")
            await raw.expect_refusal(api)
        for subject in ("sy.ev.>", "_INBOX.>", ">"):
            await builder.subscribe(subject)
            await raw.expect_refusal(subject)

        stored = {e.id async for e in EventLog(admin).read(subject=f"sy.ev.task.{task_id}.>")}
        assert stored and not stored & {e.id for e in forged}
        task = await commands.Commands(EventLog(admin)).task(task_id)
        assert task.state == t.TaskState.QUEUED

        service = await up.connect("service")
        try:
            seqs = [await EventLog(service).append(e) for e in forged]
        finally:
            await service.close()
        assert all(seqs)
    finally:
        await admin.close()
        await dispatcher.close()


async def test_each_role_does_its_work_and_is_told_clearly_what_it_may_not(up: Up) -> None:
    """Admin and dispatcher dispatch; a viewer and a builder are refused at once with a
    clear error (not a timeout); the viewer and admin read the log and ask queries; a
    builder reads only its own inbox, the dispatcher none of the log."""
    conns = {role: await up.connect(role) for role in ("admin", "dispatcher", "viewer")}
    conns["builder"] = await up.connect("builder", AGENT)
    try:
        for role in ("admin", "dispatcher"):
            result = await commands.call(conns[role], "dispatch", dispatch_body())
            assert result["task_id"].startswith("t-"), role
        for role in ("viewer", "builder"):
            with pytest.raises(CommandRejected) as refused:
                await commands.call(conns[role], "dispatch", dispatch_body())
            assert refused.value.code == "forbidden"
            assert "may not use sy.cmd.dispatch" in refused.value.message
        for role in ("admin", "viewer"):
            assert await EventLog(conns[role]).stream_last_seq() >= 2, role
            assert [e async for e in EventLog(conns[role]).read()], role
        for role in ("admin", "dispatcher", "viewer", "builder"):
            status = await ask(conns[role], "status")
            assert "summary" in status, role
        own = await ask(conns["builder"], "inbox", {"agent": AGENT})
        assert own["agent"] == AGENT
        with pytest.raises(CommandRejected, match=r"may not use sy\.qry\.inbox\.openclaw"):
            await ask(conns["builder"], "inbox", {"agent": "openclaw"})
        with pytest.raises(nats.errors.Error):
            await anext(EventLog(conns["dispatcher"]).read())
    finally:
        for nc in conns.values():
            await nc.close()


async def test_an_agent_subject_is_only_for_that_agent(up: Up) -> None:
    """Commands and queries on an agent's own subject must speak for that agent: a message
    from someone else, a read receipt for someone else or another inbox is refused by the
    services, even when an operator sends it; other commands take no agent."""
    admin = await up.connect("admin")
    try:
        own = access.token(AGENT)
        message = {"recipient": "openclaw", "type": "comment", "body": "hi"}
        sent = await commands.call(
            admin,
            "send",
            {**message, "sender": AGENT},
            subject=commands.scoped_subject("send", AGENT),
        )
        assert sent["message_id"]
        with pytest.raises(CommandRejected, match=f"may only act as '{AGENT}'") as refused:
            await commands.call(
                admin, "send", {**message, "sender": "openclaw"}, subject=f"sy.cmd.send.{own}"
            )
        assert refused.value.code == "forbidden"
        with pytest.raises(CommandRejected, match="may only act as"):
            await commands.call(
                admin,
                "mark_read",
                {"reader": "openclaw", "thread_id": sent["thread_id"], "message_ids": ["m"]},
                subject=f"sy.cmd.mark_read.{own}",
            )
        service = await up.connect("service")  # the only user NATS lets try this
        try:
            with pytest.raises(CommandRejected, match="only send and mark_read take an agent"):
                await commands.call(
                    service, "dispatch", dispatch_body(), subject=f"sy.cmd.dispatch.{own}"
                )
        finally:
            await service.close()
        with pytest.raises(CommandRejected) as other:
            await commands.call(
                admin, "inbox", {"agent": "openclaw"}, subject=f"sy.qry.inbox.{own}"
            )
        assert other.value.code == "forbidden"
    finally:
        await admin.close()


async def test_no_connection_without_the_right_credentials(up: Up) -> None:
    """No user, a wrong password, or a builder user for an agent that does not exist: the
    server refuses, and the caller hears so within seconds, naming what was refused."""
    url = json.loads((up.data_dir / "instance.json").read_text())["nats_url"]
    with pytest.raises(ConnectionFailed, match="refused no credentials"):
        await connect(url)
    with pytest.raises(ConnectionFailed, match="refused user 'admin'"):
        await connect(url, credentials=Credentials(user="admin", password="guess"))
    with pytest.raises(ConnectionFailed, match="refused user 'builder-ghost'"):
        await connect(url, credentials=Credentials(user="builder-ghost", password="x"))


def test_passwords_are_kept_private_and_the_cli_prints_a_role(up: Up) -> None:
    """users.json and the server's config (which holds the passwords) are readable by their
    owner only; `shipyard nats-user ROLE` prints settings that work for that role, and only
    for it."""
    nats_dir = access.nats_dir(up.data_dir)
    for name in ("users.json", "nats.conf"):
        assert stat.S_IMODE((nats_dir / name).stat().st_mode) == 0o600, name

    printed = up.cli("nats-user", "viewer")
    assert printed.returncode == 0, printed.stderr
    settings = dict(line.split("=", 1) for line in printed.stdout.splitlines())
    assert settings["SHIPYARD_NATS_USER"] == "viewer"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIPYARD_")}
    env.update(settings, SHIPYARD_DATA_DIR=str(up.data_dir / "elsewhere"))
    shipyard = [sys.executable, "-m", "shipyard.cli"]

    def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*shipyard, *args], env=env, input=stdin, capture_output=True, text=True, timeout=60
        )

    assert run("status").returncode == 0
    refused = run("dispatch", "-", stdin=json.dumps(dispatch_body()))
    assert refused.returncode != 0 and "may not use sy.cmd.dispatch" in refused.stderr
    env["SHIPYARD_NATS_PASSWORD"] = "wrong"
    wrong = run("status")
    assert wrong.returncode != 0 and "refused user 'viewer'" in wrong.stderr
    assert "Traceback" not in wrong.stderr

    assert up.cli("nats-user", "builder").returncode != 0
    builder = up.cli("nats-user", "builder", "--agent", AGENT)
    assert f"SHIPYARD_NATS_USER=builder-{AGENT}" in builder.stdout


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[tuple[str, Users]]:
    """A nats-server of the operator's own (not Shipyard's embedded one) that requires users."""
    users = Users.ensure(tmp_path / "secured", [])
    server = EmbeddedNats(tmp_path / "secured", users=users)
    url = server.start()
    yield url, users
    server.stop()


def test_up_and_the_cli_use_credentials_for_a_secured_server(
    tmp_path: Path, secured: tuple[str, Users]
) -> None:
    """`--nats URL` with SHIPYARD_NATS_USER / SHIPYARD_NATS_PASSWORD: `up` and the CLI both
    authenticate; without them `up` stops at once with a message naming the problem; a
    credentials file that does not exist is reported as such."""
    url, users = secured
    service = users.credentials("service")
    data = tmp_path / "data"
    creds = {"SHIPYARD_NATS_USER": service.user, "SHIPYARD_NATS_PASSWORD": service.password}
    running = Up(data, "--nats", url, "--roles", "commands,projector,gateway", env=creds)
    try:
        running.wait_ready()
        dispatched = running.cli("dispatch", "-", stdin=json.dumps(dispatch_body()))
        assert dispatched.returncode == 0, dispatched.stderr
    finally:
        running.stop()

    anonymous = Up(tmp_path / "anon", "--nats", url)
    assert anonymous.proc.wait(60) != 0
    assert "refused no credentials" in (
        anonymous.proc.stderr.read() if anonymous.proc.stderr else ""
    )
    anonymous.stop()

    missing = running.cli("status", "--nats", url, "--nats-creds", str(tmp_path / "nope.creds"))
    assert missing.returncode != 0
    assert "nope.creds does not exist" in missing.stderr


def test_a_creds_file_reaches_a_server_in_operator_mode(tmp_path: Path) -> None:
    """Against a nats-server that trusts only signed JWTs, `up --nats-creds FILE` and the CLI
    with the same file work; without it the server refuses and `up` says so."""
    server = OperatorNats(tmp_path / "secured")
    url = server.start()
    try:
        creds = str(server.creds_path)
        running = Up(
            tmp_path / "data", "--nats", url, "--nats-creds", creds, "--roles", "commands,projector"
        )
        try:
            running.wait_ready()
            dispatched = running.cli(
                "dispatch",
                "-",
                "--nats",
                url,
                "--nats-creds",
                creds,
                stdin=json.dumps(dispatch_body()),
            )
            assert dispatched.returncode == 0, dispatched.stderr
            listed = running.cli("events", "--nats", url, "--nats-creds", creds)
            assert "task_dispatched" in listed.stdout
        finally:
            running.stop()
        refused = Up(tmp_path / "anon", "--nats", url)
        assert refused.proc.wait(60) != 0
        refused.stop()
        assert "refused no credentials" in refused.errors
    finally:
        server.stop()

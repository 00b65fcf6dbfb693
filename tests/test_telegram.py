"""The Telegram bot with the real aiogram against a loopback stand-in of the Bot API."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client as NATS

from shipyard import runtime
from shipyard import settings as settings_mod
from shipyard.errors import ConfigError
from shipyard.events import text
from shipyard.events import types as t
from shipyard.events.commands import Commands, CommandService
from shipyard.events.envelope import Event, make
from shipyard.events.log import EventLog
from shipyard.gateway.telegram import Sender, TelegramService, alert_id, make_bot
from shipyard.gateway.telegram_commands import failure_keyboard
from shipyard.handler.service import Handler
from shipyard.projections import queries
from shipyard.projections.projector import Projector
from shipyard.projections.service import QueryService
from shipyard.settings import GatewaySettings, Settings, TelegramSettings
from tests import handlers as h
from tests.conftest import Up
from tests.fakes.telegram_api import TOKEN, Failure, FakeTelegram
from tests.handlers import SCRIPTED
from tests.samples import dispatch_body, hello_body
from tests.test_handler import body as greeting_body

CHAT = 4242
STRANGER = 666
DASHBOARD = "https://shipyard.example"


def tg_settings(tmp_path: Path, api: FakeTelegram, **telegram: Any) -> Settings:
    """Settings for a bot on the stand-in, with test-sized timings."""
    options: dict[str, Any] = {
        "token": TOKEN,
        "chat_ids": [CHAT],
        "api_base": api.url,
        "poll_timeout": 1,
        "request_timeout": 5.0,
        "retry_initial": 0.05,
        "retry_max": 0.4,
    }
    options.update(telegram)
    return Settings(
        data_dir=tmp_path / "data",
        gateway=GatewaySettings(public_url=DASHBOARD),
        telegram=TelegramSettings(**options),
    )


@pytest.fixture
def api() -> Iterator[FakeTelegram]:
    with FakeTelegram() as fake:
        yield fake


class Bots:
    """Starts bots on the test's log and stops whatever is still running at the end."""

    def __init__(self, tmp_path: Path, api: FakeTelegram, events: EventLog, nc: NATS) -> None:
        self.tmp_path, self.api, self.events, self.nc = tmp_path, api, events, nc
        self.running: list[TelegramService] = []

    async def start(self, **telegram: Any) -> TelegramService:
        now = telegram.pop("now", None)
        bot = TelegramService(
            tg_settings(self.tmp_path, self.api, **telegram), self.events, self.nc, now=now
        )
        await bot.start()
        self.running.append(bot)
        return bot

    async def stop(self, bot: TelegramService) -> None:
        self.running.remove(bot)
        await bot.stop()


@pytest.fixture
async def bots(
    tmp_path: Path, api: FakeTelegram, event_log: EventLog, nc: NATS
) -> AsyncIterator[Bots]:
    made = Bots(tmp_path, api, event_log, nc)
    yield made
    for bot in list(made.running):
        await made.stop(bot)


@pytest.fixture
async def services(nc: NATS, event_log: EventLog, projector: Projector) -> AsyncIterator[None]:
    """The command and query services the bot's commands talk to."""
    queries = QueryService(nc, projector)
    command_service = CommandService(nc, Commands(event_log))
    await queries.start()
    await command_service.start()
    yield
    await command_service.stop()
    await queries.stop()


# --- building a task's history by hand ---------------------------------------------------


async def dispatch(events: EventLog, title: str = "Add a health endpoint", **extra: Any) -> str:
    body = dispatch_body(**extra)
    body["action_name"] = body["payload"]["task_title"] = title
    return (await Commands(events).dispatch(body)).task_id


async def append(events: EventLog, task_id: str, *data: t.EventData) -> list[Event[Any]]:
    """Append ``data`` to a task in one batch; the events come back with their sequences."""
    made = [make(d, aggregate_id=task_id, actor="handler:test") for d in data]
    seqs = await events.append_batch(made)
    return [msgspec.structs.replace(e, seq=seq) for e, seq in zip(made, seqs, strict=True)]


def claimed(run_id: str = "r-1", attempt: int = 1) -> t.TaskClaimed:
    return t.TaskClaimed(run_id=run_id, handler="h-test", agent="claude", attempt=attempt)


def run_failed(
    run_id: str = "r-1", reason: str = "builder_failed", error: str = "", **fate: Any
) -> list[t.EventData]:
    """A failed run and its fate in one batch, as the handler appends them."""
    finished = t.RunFinished(
        run_id=run_id,
        outcome=t.TaskState.FAILED,
        reason=reason,
        phase=t.Phase.BUILD,
        error=error,
        summary="no heartbeat for 901s" if reason in ("agent_silent", "handler_lost") else "",
    )
    if fate.get("requeued"):
        return [finished, t.TaskRequeued(attempt=2, reason="attempt 1 failed")]
    return [finished, t.TaskFinished(outcome=t.TaskState.FAILED, reason=reason, run_id=run_id)]


async def delivered(events: EventLog, chat: int, source: Event[Any]) -> bool:
    return bool(await events.last_seq("alert", alert_id(chat, source.id)))


# --- alerts ------------------------------------------------------------------------------


async def test_started_and_succeeded_alerts_carry_title_figures_and_a_link(
    bots: Bots, api: FakeTelegram, event_log: EventLog
) -> None:
    """A claimed run sends "Build started"; a succeeded one sends title, duration, turns and
    cost from its report, with a link to the run on the dashboard."""
    await bots.start()
    task_id = await dispatch(event_log, title="Add <health> & co")
    await append(event_log, task_id, claimed())
    started = await api.wait_messages(1, chat_id=CHAT)
    assert "Build started" in started[0]["text"]
    assert "Add <health> & co" in started[0]["text"]  # escaped on the wire, shown as written
    assert "&lt;health&gt; &amp; co" in started[0]["html"]
    report = t.ReportWritten(
        run_id="r-1",
        path="/tmp/r.html",
        summary="ok",
        files_changed=["README.md", "app/health.py"],
        duration_s=192.4,
        turns=12,
        cost_usd=0.4199,
        heal_rounds=1,
    )
    finished = t.RunFinished(run_id="r-1", outcome=t.TaskState.SUCCEEDED, summary="all good")
    await append(event_log, task_id, report)
    await append(
        event_log,
        task_id,
        finished,
        t.TaskFinished(outcome=t.TaskState.SUCCEEDED, run_id="r-1"),
    )
    done = (await api.wait_messages(2, chat_id=CHAT))[1]
    assert "Build succeeded" in done["text"]
    assert "3m 12s · 12 turns · $0.42" in done["text"]
    assert "2 files changed · healed in 1 round" in done["text"]
    assert f'href="{DASHBOARD}/#/?run=r-1"' in done["html"]
    assert "reply_markup" not in done


async def test_a_failure_alert_shows_phase_reason_last_error_lines_and_buttons(
    bots: Bots, api: FakeTelegram, event_log: EventLog
) -> None:
    """A failed run sends one alert — phase, reason, the last lines of the error (escaped),
    the task's fate — with Retry, Cancel and Open buttons; its task_finished adds none."""
    await bots.start(alerts=["failed"])
    task_id = await dispatch(event_log)
    error = "\n".join(f"line {i}" for i in range(40)) + "\nAssertionError: <b>1 & 2</b>"
    await append(event_log, task_id, claimed())
    await append(event_log, task_id, *run_failed(error=error))
    sent = await api.wait_messages(1, chat_id=CHAT)
    text = sent[0]["text"]
    assert "Build failed" in text
    assert "in BUILD: builder_failed" in text
    assert "AssertionError: <b>1 & 2</b>" in text
    assert "line 39" in text and "line 3\n" not in text
    assert "The task has failed." in text
    buttons = sent[0]["reply_markup"]["inline_keyboard"][0]
    assert [b["text"] for b in buttons] == ["Retry", "Cancel", "Open"]
    assert buttons[0]["callback_data"] == f"retry:{task_id}"
    assert buttons[1]["callback_data"] == f"cancel:{task_id}"
    assert buttons[2]["url"] == f"{DASHBOARD}/#/?run=r-1"
    # One failure, one alert: nothing else arrives for the task_finished.
    marker = await dispatch(event_log, title="marker")
    await append(event_log, marker, *run_failed(run_id="r-2"))
    assert len(await api.wait_messages(2, chat_id=CHAT)) == 2
    assert "marker" in api.texts(CHAT)[1]


async def test_a_retried_failure_says_so(
    bots: Bots, api: FakeTelegram, event_log: EventLog
) -> None:
    """When the failed run is retried by policy, its alert says which attempt comes next."""
    await bots.start(alerts=["failed"])
    task_id = await dispatch(event_log)
    await append(event_log, task_id, claimed(), *run_failed(requeued=True))
    (sent,) = await api.wait_messages(1, chat_id=CHAT)
    assert "Retrying as attempt 2." in sent["text"]


async def test_stale_and_watchdog_alerts(
    bots: Bots, api: FakeTelegram, event_log: EventLog
) -> None:
    """RunStale sends a STALE alert with the phase and percent; a run the watchdog failed
    sends "FAILED by the watchdog" with the reason — not a second, generic failure."""
    await bots.start()
    task_id = await dispatch(event_log)
    await append(event_log, task_id, claimed())
    progress = t.WorkProgress(run_id="r-1", phase=t.Phase.BUILD, percent=55)
    stale = t.RunStale(run_id="r-1", silent_for=612.0, detected_by="h-test")
    await append(event_log, task_id, progress)
    await append(event_log, task_id, stale)
    await append(event_log, task_id, *run_failed(reason="agent_silent"))
    sent = await api.wait_messages(3, chat_id=CHAT)
    started, stale_alert, verdict = (m["text"] for m in sent)
    assert "Build started" in started
    assert "STALE" in stale_alert
    assert "No heartbeat for 10m 12s in BUILD at 55%" in stale_alert
    assert "FAILED by the watchdog" in verdict
    assert "agent_silent in BUILD" in verdict
    assert "Build failed" not in verdict
    assert [b["text"] for b in sent[2]["reply_markup"]["inline_keyboard"][0]][:2] == [
        "Retry",
        "Cancel",
    ]


async def test_escalated_group_and_dependant_failure_alerts(
    bots: Bots, api: FakeTelegram, event_log: EventLog
) -> None:
    """TaskEscalated names the new task and agent; GroupFinished lists its tasks and
    verdict; a dependant failed without a run gets a "Task failed" alert."""
    await bots.start()
    first = await dispatch(event_log, title="First try")
    second = await dispatch(event_log, title="Second try")
    escalated = t.TaskEscalated(task_id=second, to_agent="codex", from_agent="claude", note="n")
    await append(event_log, first, escalated)
    group = t.GroupFinished(
        group="front & back", tasks=[first, second], succeeded=[first], failed=[second]
    )
    await event_log.append(make(group, aggregate_id="g-test", actor="handler:test"))
    dependant = await dispatch(event_log, title="Waits")
    await append(
        event_log,
        dependant,
        t.TaskFinished(outcome=t.TaskState.FAILED, reason=f"prerequisite {first} failed"),
    )
    sent = await api.wait_messages(3, chat_id=CHAT)
    escalated_text, group_text, dependant_text = (m["text"] for m in sent)
    assert "Escalated · First try" in escalated_text
    assert "to codex" in escalated_text and f"new task {second}: Second try" in escalated_text
    assert "Group did not pass · front & back" in group_text
    assert "2 tasks: 1 succeeded, 1 failed" in group_text
    assert "✓ First try" in group_text and "✕ Second try" in group_text
    assert "Task failed · Waits" in dependant_text
    assert "without running: prerequisite" in dependant_text


async def test_phase_alerts_are_off_by_default_and_on_when_chosen(
    bots: Bots, api: FakeTelegram, event_log: EventLog
) -> None:
    """Phase-by-phase alerts are sent only when `phase` is among the chosen alerts."""
    task_id = await dispatch(event_log)
    ended = t.PhaseChanged(run_id="r-1", phase=t.Phase.PLAN, status=t.PhaseStatus.SUCCEEDED)
    (phase_event,) = await append(event_log, task_id, ended)
    quiet = await bots.start()
    await api.wait_until(lambda: quiet.position >= phase_event.seq, what="the bot to read it")
    assert api.texts(CHAT) == []
    await bots.stop(quiet)
    await bots.start(alerts=["phase"])
    (sent,) = await api.wait_messages(1, chat_id=CHAT)
    assert "PLAN succeeded" in sent["text"]


async def test_every_allowed_chat_gets_each_alert_once(
    bots: Bots, api: FakeTelegram, event_log: EventLog
) -> None:
    """Each chat on the list gets the alert, and its delivery is recorded per chat."""
    bot = await bots.start(chat_ids=[CHAT, -100200])
    task_id = await dispatch(event_log)
    (event,) = await append(event_log, task_id, claimed())
    await api.wait_messages(1, chat_id=-100200)
    await api.wait_messages(1, chat_id=CHAT)
    await api.wait_until(lambda: bot.position >= event.seq, what="the deliveries recorded")
    assert await delivered(event_log, CHAT, event)
    assert await delivered(event_log, -100200, event)


async def test_recorded_deliveries_stay_out_of_the_activity_timeline(
    bots: Bots, api: FakeTelegram, event_log: EventLog, projector: Projector
) -> None:
    """The read models take `alert_delivered` events in their stride: the projector passes
    them, and the activity timeline does not list them."""
    bot = await bots.start()
    task_id = await dispatch(event_log)
    (claim,) = await append(event_log, task_id, claimed())
    await api.wait_until(lambda: bot.position >= claim.seq, what="the delivery to be recorded")
    last = await event_log.stream_last_seq()
    assert last > claim.seq  # the record itself
    await asyncio.wait_for(projector.wait_for(last), 10)
    rows = await projector.models.run(lambda: queries.activity(projector.models.con, limit=50))
    assert [r.kind for r in rows] == ["task_claimed", "task_dispatched"]
    (record,) = [e async for e in event_log.read(start=last)]
    assert text.summary(record).startswith(f"started alert on telegram to {CHAT}")


# --- delivery ----------------------------------------------------------------------------


async def test_a_429_waits_retry_after_then_sends(
    bots: Bots, api: FakeTelegram, event_log: EventLog
) -> None:
    """Told 429 with retry_after, the bot waits that long and sends the alert once."""
    api.fail("sendMessage", Failure.retry_after(1))
    await bots.start()
    task_id = await dispatch(event_log)
    await append(event_log, task_id, claimed())
    await api.wait_messages(1, chat_id=CHAT)
    calls = [c for c in api.calls if c.method == "sendMessage"]
    assert [c.status for c in calls] == [429, 200]
    assert calls[1].at - calls[0].at >= 0.95
    assert len(api.sent(CHAT)) == 1


async def test_a_500_and_a_dropped_connection_are_retried(
    bots: Bots, api: FakeTelegram, event_log: EventLog
) -> None:
    """A server error and a connection closed without an answer are retried with backoff
    until the alert is sent, once."""
    api.fail("sendMessage", Failure.server_error(), Failure.drop(), Failure.server_error())
    await bots.start()
    task_id = await dispatch(event_log)
    (event,) = await append(event_log, task_id, claimed())
    await api.wait_messages(1, chat_id=CHAT)
    statuses = [c.status for c in api.calls if c.method == "sendMessage"]
    assert statuses == [500, 0, 500, 200]
    assert len(api.sent(CHAT)) == 1
    bot = bots.running[0]
    await api.wait_until(lambda: bot.position >= event.seq, what="the delivery to be recorded")
    assert await delivered(event_log, CHAT, event)


async def test_a_bot_that_was_down_sends_what_it_missed_and_nothing_twice(
    bots: Bots, api: FakeTelegram, event_log: EventLog
) -> None:
    """After a restart the bot sends the alerts of events it missed while down, and none it
    had already sent; a second restart sends nothing at all."""
    first = await bots.start()
    task_id = await dispatch(event_log)
    (claim,) = await append(event_log, task_id, claimed())
    await api.wait_messages(1, chat_id=CHAT)
    await api.wait_until(lambda: first.position >= claim.seq, what="the first alert recorded")
    await bots.stop(first)

    stale = t.RunStale(run_id="r-1", silent_for=700.0, detected_by="h-test")
    await append(event_log, task_id, stale)
    missed = await append(event_log, task_id, *run_failed(reason="handler_lost"))
    second = await bots.start()
    sent = await api.wait_messages(3, chat_id=CHAT)
    assert ["Build started" in sent[0]["text"], "STALE" in sent[1]["text"]] == [True, True]
    assert "FAILED by the watchdog" in sent[2]["text"]
    last = await event_log.stream_last_seq()
    await api.wait_until(lambda: second.position >= missed[-1].seq)
    await bots.stop(second)

    third = await bots.start()
    await api.wait_until(lambda: third.position >= last, what="the third bot to catch up")
    assert len(api.sent(CHAT)) == 3
    records = [e async for e in event_log.read() if e.type == "alert_delivered"]
    assert len(records) == 3
    assert len({r.aggregate_id for r in records}) == 3


async def test_events_older_than_the_horizon_send_nothing(
    bots: Bots, api: FakeTelegram, event_log: EventLog
) -> None:
    """A bot that starts later than `horizon` after an event never sends its alert."""
    task_id = await dispatch(event_log)
    (old,) = await append(event_log, task_id, claimed())
    later = datetime.now(UTC) + timedelta(hours=2)
    bot = await bots.start(horizon=3600.0, now=lambda: later)
    fresh = await dispatch(event_log, title="Fresh")
    (new,) = await append(event_log, fresh, claimed(run_id="r-2"))
    await api.wait_until(lambda: bot.position >= new.seq, what="the bot to read the new event")
    (sent,) = api.sent(CHAT)
    assert "Fresh" in sent["text"]
    assert not await delivered(event_log, CHAT, old)


async def test_a_refused_open_button_falls_back_to_the_other_buttons(
    bots: Bots, api: FakeTelegram, event_log: EventLog
) -> None:
    """When Telegram refuses the Open button's URL, the alert goes out with Retry and
    Cancel, and the link stays in the text."""
    api.refuse_button_urls = True
    await bots.start(alerts=["failed"])
    task_id = await dispatch(event_log)
    await append(event_log, task_id, claimed(), *run_failed())
    (sent,) = await api.wait_messages(1, chat_id=CHAT)
    assert [b["text"] for b in sent["reply_markup"]["inline_keyboard"][0]] == ["Retry", "Cancel"]
    assert f"{DASHBOARD}/#/?run=r-1" in sent["html"]


def test_no_open_button_points_at_a_loopback_dashboard() -> None:
    """The Open button is left out when the dashboard's address is loopback, which a phone
    cannot open; Retry and Cancel stay."""
    for url, buttons in (
        ("http://127.0.0.1:7780/#/?run=r-1", ["Retry", "Cancel"]),
        ("http://localhost:7780/#/?run=r-1", ["Retry", "Cancel"]),
        (f"{DASHBOARD}/#/?run=r-1", ["Retry", "Cancel", "Open"]),
    ):
        markup = failure_keyboard("t-1", url)
        assert [b.text for b in markup.inline_keyboard[0]] == buttons


async def test_markup_telegram_refuses_falls_back_to_plain_text(
    tmp_path: Path, api: FakeTelegram
) -> None:
    """A message whose HTML Telegram refuses is sent again as plain text, not dropped."""
    cfg = tg_settings(tmp_path, api).telegram
    bot = make_bot(cfg)
    try:
        assert await Sender(bot, cfg).send(CHAT, "<blink>look</blink> &amp; see", None)
    finally:
        await bot.session.close()
    assert [c.status for c in api.calls if c.method == "sendMessage"] == [400, 200]
    assert api.texts(CHAT) == ["look & see"]


async def test_an_unreachable_bot_api_disturbs_nothing(
    tmp_path: Path, event_log: EventLog, nc: NATS
) -> None:
    """With the Bot API unreachable, the bot starts, the log takes appends as usual, and
    the bot stops cleanly."""
    with FakeTelegram() as gone:
        pass  # closed: its port now refuses connections
    bot = TelegramService(tg_settings(tmp_path, gone), event_log, nc)
    await bot.start()
    task_id = await dispatch(event_log)
    (event,) = await append(event_log, task_id, claimed())
    assert (await event_log.history("task", task_id))[-1].id == event.id
    await asyncio.wait_for(bot.stop(), 10)
    assert not await delivered(event_log, CHAT, event)


# --- commands and buttons ----------------------------------------------------------------


async def test_status_queue_and_history_commands(
    bots: Bots, api: FakeTelegram, event_log: EventLog, projector: Projector, services: None
) -> None:
    """/status shows running builds with phase and percent, /queue the waiting tasks by
    priority, /history [n] the last finished runs."""
    running = await dispatch(event_log, title="Running one")
    await append(event_log, running, claimed())
    progress = t.WorkProgress(run_id="r-1", phase=t.Phase.VALIDATE, percent=62, action="tests")
    await append(event_log, running, progress)
    await dispatch(event_log, title="Later", priority="low")
    await dispatch(event_log, title="Sooner", priority="urgent")
    done = await dispatch(event_log, title="Done one")
    await append(event_log, done, claimed(run_id="r-9"))
    last = await append(
        event_log,
        done,
        t.RunFinished(run_id="r-9", outcome=t.TaskState.SUCCEEDED),
        t.TaskFinished(outcome=t.TaskState.SUCCEEDED, run_id="r-9"),
    )
    await asyncio.wait_for(projector.wait_for(last[-1].seq), 10)
    await bots.start(alerts=[])

    api.user_says(CHAT, "/status")
    status = (await api.wait_messages(1, chat_id=CHAT))[0]["text"]
    assert "Running: 1" in status
    assert "VALIDATE 62% · Running one" in status
    assert "Queue: 2 waiting" in status

    api.user_says(CHAT, "/queue")
    queue = (await api.wait_messages(2, chat_id=CHAT))[1]["text"]
    assert queue.index("[urgent] Sooner") < queue.index("[low] Later")
    assert "Running one" not in queue

    api.user_says(CHAT, "/history 3")
    history = (await api.wait_messages(3, chat_id=CHAT))[2]["text"]
    assert "Last 1 of 1 runs" in history
    assert "✅ Done one" in history

    api.user_says(CHAT, "/help")
    assert "/retry ID" in (await api.wait_messages(4, chat_id=CHAT))[3]["text"]


async def test_retry_cancel_and_inbox_commands(
    bots: Bots, api: FakeTelegram, event_log: EventLog, projector: Projector, services: None
) -> None:
    """/retry queues a failed task again, /cancel cancels a queued one, /inbox shows the
    operator's unread messages — split over several messages when long."""
    failed = await dispatch(event_log, title="Broke")
    await append(event_log, failed, claimed(), *run_failed())
    queued = await dispatch(event_log, title="Unwanted")
    for i in range(12):
        await event_log.append(
            make(
                t.MessageSent(
                    message_id=f"m-{i}",
                    sender="claude",
                    recipient="operator",
                    type=t.MessageType.QUESTION,
                    body=f"question {i}: " + "<why?> " * 70,
                ),
                aggregate_id="th-1",
                actor="agent:claude",
            )
        )
    await asyncio.wait_for(projector.wait_for(await event_log.stream_last_seq()), 10)
    await bots.start(alerts=[])

    api.user_says(CHAT, f"/retry {failed}")
    (reply,) = await api.wait_messages(1, chat_id=CHAT)
    assert f"Queued {failed} again as attempt 2." in reply["text"]
    requeued = (await event_log.history("task", failed))[-1]
    assert isinstance(requeued.data, t.TaskRequeued)
    assert requeued.actor == "telegram:operator"

    api.user_says(CHAT, f"/cancel {queued}")
    assert f"Cancelled {queued}." in (await api.wait_messages(2, chat_id=CHAT))[1]["text"]
    api.user_says(CHAT, f"/cancel {queued}")
    again = (await api.wait_messages(3, chat_id=CHAT))[2]["text"]
    assert f"Refused: task {queued} already cancelled" in again
    api.user_says(CHAT, "/retry")
    assert "Usage: /retry ID" in (await api.wait_messages(4, chat_id=CHAT))[3]["text"]

    api.user_says(CHAT, "/inbox")
    await api.wait_until(lambda: "question 11:" in api.texts(CHAT)[-1], what="the whole inbox")
    parts = api.sent(CHAT)[4:]
    assert len(parts) > 1
    assert "operator: 12 unread" in parts[0]["text"]
    assert "question 11: <why?>" in parts[-1]["text"]
    assert all(len(p["html"]) <= 4096 for p in parts)


async def test_unknown_chats_get_a_polite_refusal_that_is_logged(
    bots: Bots,
    api: FakeTelegram,
    event_log: EventLog,
    services: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A command from a chat not on the list is refused politely, logged, and not run."""
    task_id = await dispatch(event_log)
    await bots.start(alerts=[])
    with caplog.at_level(logging.WARNING, logger="shipyard.gateway.telegram_commands"):
        api.user_says(STRANGER, f"/cancel {task_id}", username="mallory")
        (reply,) = await api.wait_messages(1, chat_id=STRANGER)
    assert "Sorry, this Shipyard only answers its operator's chats" in reply["text"]
    assert str(STRANGER) in reply["text"]
    refused = [r for r in caplog.records if getattr(r, "action", "") == "telegram_refused"]
    assert refused and refused[0].who == "telegram:mallory"
    assert len(await event_log.history("task", task_id)) == 1


async def test_the_retry_button_under_a_failure_alert(
    bots: Bots, api: FakeTelegram, event_log: EventLog, services: None
) -> None:
    """Pressing Retry under a failure alert queues the task again and answers the press;
    a press from a chat not on the list is refused and changes nothing."""
    await bots.start(alerts=["failed"])
    task_id = await dispatch(event_log)
    await append(event_log, task_id, claimed(), *run_failed())
    (alert,) = await api.wait_messages(1, chat_id=CHAT)
    retry = alert["reply_markup"]["inline_keyboard"][0][0]["callback_data"]

    stranger_query = api.user_presses(STRANGER, retry)
    await api.wait_until(lambda: any(a["callback_query_id"] == stranger_query for a in api.answers))
    assert "may not" in api.answers[-1]["text"]
    assert isinstance((await event_log.history("task", task_id))[-1].data, t.TaskFinished)

    query = api.user_presses(CHAT, retry, message_id=alert["message_id"])
    await api.wait_until(lambda: any(a["callback_query_id"] == query for a in api.answers))
    answer = next(a for a in api.answers if a["callback_query_id"] == query)
    assert f"Queued {task_id} again as attempt 2." in answer["text"]
    reply = (await api.wait_messages(2, chat_id=CHAT))[1]
    assert "attempt 2" in reply["text"]
    last = (await event_log.history("task", task_id))[-1]
    assert isinstance(last.data, t.TaskRequeued)


# --- settings and `shipyard up` ----------------------------------------------------------


def test_telegram_settings_come_from_the_environment() -> None:
    """SHIPYARD_TELEGRAM_* set the token, the chats (a comma list), the API base and the
    alerts; the token is never shown, and a malformed one is a clear error."""
    env = {
        "SHIPYARD_DATA_DIR": "/tmp/nowhere",
        "SHIPYARD_TELEGRAM_TOKEN": TOKEN,
        "SHIPYARD_TELEGRAM_CHAT_IDS": "42, -100123",
        "SHIPYARD_TELEGRAM_API_BASE": "http://127.0.0.1:8081/",
        "SHIPYARD_TELEGRAM_ALERTS": "failed,watchdog",
    }
    cfg = settings_mod.load(env=env).telegram
    assert cfg.enabled
    assert cfg.chat_ids == [42, -100123]
    assert cfg.api_base == "http://127.0.0.1:8081"
    assert cfg.alerts == [t.AlertKind.FAILED, t.AlertKind.WATCHDOG]
    assert TOKEN not in repr(cfg)
    default = settings_mod.load(env={"SHIPYARD_DATA_DIR": "/tmp/nowhere"}).telegram
    assert not default.enabled
    assert t.AlertKind.PHASE not in default.alerts and t.AlertKind.STALE in default.alerts
    with pytest.raises(ConfigError, match=r"telegram\.token") as bad:
        settings_mod.load(env={**env, "SHIPYARD_TELEGRAM_TOKEN": "not-a-token-secret"})
    assert "not-a-token-secret" not in str(bad.value)


async def test_without_a_token_or_chats_nothing_telegram_starts(
    tmp_path: Path, event_log: EventLog, nc: NATS
) -> None:
    """The telegram role with no token, or a token and no chats, starts nothing."""
    for telegram in (TelegramSettings(), TelegramSettings(token=TOKEN)):
        cfg = Settings(data_dir=tmp_path, telegram=telegram)
        started: list[Any] = []
        info: dict[str, Any] = {"roles": ["telegram"]}
        await runtime._start_roles(cfg, ("telegram",), nc, event_log, started, info)
        assert started == []
        assert info == {"roles": []}


def test_the_cli_does_not_import_aiogram_until_a_bot_runs() -> None:
    """aiogram takes seconds to import: the CLI and `shipyard up` without a bot never load it."""
    probe = "import sys, shipyard.cli, shipyard.runtime; print('aiogram' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "False"


def test_shipyard_up_sends_alerts_for_a_real_build(tmp_path: Path, api: FakeTelegram) -> None:
    """`shipyard up` with the Telegram env set runs the bot in the same process: a build by
    a scripted builder sends "Build started" and then "Build succeeded", and /history from
    the chat lists it."""
    data = tmp_path / "data"
    data.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    q = json.dumps
    (data / "shipyard.toml").write_text(
        f"""
[handler]
default_agent = "scripted"
workdir_roots = [{q(str(work))}]

[agents.scripted]
kind = "command"
command = [{q(sys.executable)}, {q(SCRIPTED)}, "{{phase}}", "ok"]

[telegram]
poll_timeout = 1
"""
    )
    env = {
        "SHIPYARD_TELEGRAM_TOKEN": TOKEN,
        "SHIPYARD_TELEGRAM_CHAT_IDS": str(CHAT),
        "SHIPYARD_TELEGRAM_API_BASE": api.url,
    }
    running = Up(data, env=env)
    running.wait_ready()
    try:
        body = hello_body(str(work / "demo"))
        result = running.cli("dispatch", "-", stdin=json.dumps(body))
        assert result.returncode == 0, result.stderr
        task_id = result.stdout.strip()
        deadline = time.monotonic() + 60
        while not any("Build succeeded" in text for text in api.texts(CHAT)):
            assert time.monotonic() < deadline, f"no success alert; got {api.texts(CHAT)}"
            assert running.proc.poll() is None, "shipyard up exited"
            time.sleep(0.1)
        texts = api.texts(CHAT)
        assert "Build started" in texts[0]
        success = next(m for m in api.sent(CHAT) if "Build succeeded" in m["text"])
        assert "Add a health endpoint" in success["text"] and task_id in success["text"]
        assert "/#/?run=r" in success["html"]
        # The same process answers commands (asked again while the read models catch up).
        while not any("✅ Add a health endpoint" in text for text in api.texts(CHAT)):
            seen = len(api.texts(CHAT))
            api.user_says(CHAT, "/history")
            while len(api.texts(CHAT)) == seen:
                assert time.monotonic() < deadline, f"no answer to /history: {api.texts(CHAT)}"
                time.sleep(0.1)
        assert "telegram:  alerts to 1 chat(s)" in "".join(running.banner)
        assert "gateway, telegram)" in running.banner[0]
    finally:
        assert running.stop() == 0
    assert "Traceback" not in running.errors


async def test_a_group_run_by_two_handlers_sends_one_group_alert(
    tmp_path: Path, bots: Bots, api: FakeTelegram, event_log: EventLog
) -> None:
    """Three tasks of one group run by two handlers, one failing, end in one group_finished
    event and exactly one group alert naming the failed task."""
    cfg = h.settings(tmp_path, concurrency=2)
    running = [Handler(event_log, cfg, handler_id=name) for name in ("left", "right")]
    for handler in running:
        await handler.start()
    try:
        bot = await bots.start(alerts=["group"])
        commands = Commands(event_log)
        for name, agent in (("api", "ok"), ("ui", "ok"), ("docs", "fail")):
            await commands.dispatch(greeting_body(tmp_path, name, agent=agent, group="release-3"))
        outcome = await h.wait_for(event_log, lambda e: e.type == "group_finished")
        (sent,) = await api.wait_messages(1, chat_id=CHAT)
        assert "Group did not pass · release-3" in sent["text"]
        assert "3 tasks: 2 succeeded, 1 failed" in sent["text"]
        assert "✕ Greeting docs" in sent["text"]
        for handler in running:
            await handler.settled(outcome.seq)
        last = await event_log.stream_last_seq()
        await api.wait_until(lambda: bot.position >= last, what="the bot to read every event")
        assert len(api.texts(CHAT)) == 1
    finally:
        for handler in running:
            await handler.stop()

"""What the Telegram bot answers: a few commands and the buttons under failure alerts.

Only allow-listed chats are served; anyone else gets a polite refusal, and the attempt is
logged. Commands read the read models over NATS (``sy.qry.*``) and change things through
the command service (``sy.cmd.*``), so they work with the projector and the command service
in another process — and say so plainly when neither answers.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from aiogram import Router
from aiogram.filters import Command, CommandObject
from aiogram.types import CallbackQuery, InlineKeyboardButton, InlineKeyboardMarkup, Message
from aiogram.types import User as TelegramUser
from nats.aio.client import Client as NATS

from shipyard.errors import CommandRejected, ShipyardError
from shipyard.events import commands
from shipyard.events import types as t
from shipyard.events.envelope import valid_id
from shipyard.gateway import alerts
from shipyard.gateway.alerts import clip, duration, esc
from shipyard.projections import service as queries
from shipyard.settings import TelegramSettings

log = logging.getLogger(__name__)

Send = Callable[[int, str, InlineKeyboardMarkup | None], Awaitable[bool]]

HISTORY_DEFAULT = 5  # runs /history shows without a number
HISTORY_MAX = 30
QUEUE_ROWS = 20
INBOX_ROWS = 10
CALLBACK_TEXT = 200  # characters Telegram shows in a button's answer

HELP = """<b>Shipyard</b> answers:
/status — running builds with phase and percent
/queue — tasks waiting to run
/history [n] — the last n finished runs
/retry ID — run a failed or cancelled task again
/cancel ID — cancel a queued or running task
/inbox [agent] — unread messages (default: {agent})"""

REFUSAL = (
    "Sorry, this Shipyard only answers its operator's chats. If that is you, add this chat's "
    "id, <code>{chat}</code>, to <code>telegram.chat_ids</code> and restart it."
)
OUTCOME_ICONS = {"succeeded": "✅", "failed": "❌", "cancelled": "⏹"}


def failure_keyboard(task_id: str, link: str) -> InlineKeyboardMarkup:
    """Retry / Cancel / Open under a failure alert; the first two carry the task id."""
    row = [
        InlineKeyboardButton(text="Retry", callback_data=f"retry:{task_id}"),
        InlineKeyboardButton(text="Cancel", callback_data=f"cancel:{task_id}"),
    ]
    if link and not _loopback(link):
        row.append(InlineKeyboardButton(text="Open", url=link))
    return InlineKeyboardMarkup(inline_keyboard=[row])


def _loopback(url: str) -> bool:
    """A phone cannot open the dashboard at a loopback address (set `gateway.public_url`),
    and Telegram refuses some such button URLs outright."""
    host = urlsplit(url).hostname or ""
    return host == "localhost" or host.startswith("127.") or host == "::1"


def _who(user: TelegramUser | None) -> str:
    if user is None:
        return "telegram"
    return f"telegram:{user.username or user.id}"


class BotCommands:
    """Handlers for one bot; :meth:`router` wires them into an aiogram dispatcher."""

    def __init__(
        self, nc: NATS, settings: TelegramSettings, *, send: Send, base_url: str = ""
    ) -> None:
        self.nc = nc
        self.settings = settings
        self.allowed = frozenset(settings.chat_ids)
        self.send = send
        self.base_url = base_url

    def router(self) -> Router:
        router = Router(name="shipyard")
        router.message.register(self.refuse, self.unknown_chat)
        router.message.register(self.status, Command("status"))
        router.message.register(self.queue, Command("queue"))
        router.message.register(self.history, Command("history"))
        router.message.register(self.retry, Command("retry"))
        router.message.register(self.cancel, Command("cancel"))
        router.message.register(self.inbox, Command("inbox"))
        router.message.register(self.help)
        router.callback_query.register(self.button)
        return router

    # --- who may ask --------------------------------------------------------------------

    def unknown_chat(self, message: Message) -> bool:
        return message.chat.id not in self.allowed

    async def refuse(self, message: Message) -> None:
        user = message.from_user
        log.warning(
            "telegram: refused a message from chat %s (%s)",
            message.chat.id,
            _who(user),
            extra={"action": "telegram_refused", "chat_id": message.chat.id, "who": _who(user)},
        )
        await self.send(message.chat.id, REFUSAL.format(chat=message.chat.id), None)

    async def _reply(self, message: Message, text: str) -> None:
        await self.send(message.chat.id, text, None)

    # --- commands -----------------------------------------------------------------------

    async def help(self, message: Message) -> None:
        await self._reply(message, HELP.format(agent=esc(self.settings.inbox_agent)))

    async def status(self, message: Message) -> None:
        await self._reply(message, await self._answer(self._status_text))

    async def queue(self, message: Message) -> None:
        await self._reply(message, await self._answer(self._queue_text))

    async def history(self, message: Message, command: CommandObject) -> None:
        arg = (command.args or "").strip()
        if arg and not arg.isdigit():
            await self._reply(message, "Usage: /history [n], n a number of runs.")
            return
        limit = max(1, min(int(arg or HISTORY_DEFAULT), HISTORY_MAX))
        await self._reply(message, await self._answer(self._history_text, limit))

    async def inbox(self, message: Message, command: CommandObject) -> None:
        agent = (command.args or "").strip() or self.settings.inbox_agent
        await self._reply(message, await self._answer(self._inbox_text, agent))

    async def retry(self, message: Message, command: CommandObject) -> None:
        await self._change(message, "retry", command.args)

    async def cancel(self, message: Message, command: CommandObject) -> None:
        await self._change(message, "cancel", command.args)

    async def _change(self, message: Message, name: str, args: str | None) -> None:
        task_id = (args or "").strip()
        if not valid_id(task_id):
            await self._reply(message, f"Usage: /{name} ID, the task id (t-…).")
            return
        text = await self.run_command(name, task_id, _who(message.from_user))
        await self._reply(message, text)

    async def run_command(self, name: str, task_id: str, actor: str) -> str:
        """Retry or cancel a task; the reply, refusals included, as one sentence."""
        log.info(
            "telegram: %s %s by %s",
            name,
            task_id,
            actor,
            extra={"action": "telegram_command", "command": name, "task_id": task_id},
        )
        body: dict[str, Any] = {"task_id": task_id}
        if name == "cancel":
            body["reason"] = f"cancelled by {actor}"
        try:
            result = await commands.call(self.nc, name, body, actor=actor)
        except CommandRejected as e:
            return f"Refused: {esc(e.message)}"
        except ShipyardError as e:
            return f"Could not {name}: {esc(e.message)}"
        shown = f"<code>{esc(task_id)}</code>"
        if name == "retry":
            return f"🔁 Queued {shown} again as attempt {result.get('attempt', '?')}."
        if result.get("state") == "cancelling":
            return f"⏹ Cancelling {shown}: its builder is being stopped."
        return f"⏹ Cancelled {shown}."

    # --- buttons ------------------------------------------------------------------------

    async def button(self, query: CallbackQuery) -> None:
        chat_id = query.message.chat.id if query.message else query.from_user.id
        actor = _who(query.from_user)
        if chat_id not in self.allowed:
            log.warning(
                "telegram: refused a button press from chat %s (%s)",
                chat_id,
                actor,
                extra={"action": "telegram_refused", "chat_id": chat_id, "who": actor},
            )
            await self._answer_query(query, "Sorry, this chat may not do that.")
            return
        name, _, task_id = (query.data or "").partition(":")
        if name not in ("retry", "cancel") or not valid_id(task_id):
            await self._answer_query(query, "That button no longer does anything.")
            return
        text = await self.run_command(name, task_id, actor)
        await self._answer_query(query, alerts.plain(text))
        await self.send(chat_id, text, None)

    async def _answer_query(self, query: CallbackQuery, text: str) -> None:
        # Only the button's spinner depends on it; the reply message says the same.
        try:
            await query.answer(clip(text, CALLBACK_TEXT))
        except Exception as e:
            log.info("telegram: could not answer a button press: %s", e)

    # --- reading the read models ---------------------------------------------------------

    async def _answer(self, render: Callable[..., Awaitable[str]], *args: Any) -> str:
        try:
            return await render(*args)
        except ShipyardError as e:
            return f"Could not ask Shipyard: {esc(e.message)}"

    async def _status_text(self) -> str:
        result = await queries.ask(self.nc, "status")
        summary = result["summary"]
        live = summary["live"]
        lines = []
        if not result["projection"]["caught_up"]:
            lines.append(f"<i>Catching up with the log ({result['projection']['percent']}%).</i>")
        stale = f" · {summary['stale_runs']} STALE" if summary["stale_runs"] else ""
        lines.append(f"<b>Running: {len(live)}</b>{stale}" if live else "Nothing running — idle.")
        for run in live:
            phase = t.Phase(run["phase"]).label if run["phase"] else "CLAIMED"
            badge = " ⚠️ STALE" if run["stale"] else ""
            lines.append(
                f"▸ <b>{phase}</b> {run['percent']}% · {esc(clip(run['title'], 120))}{badge}"
            )
            detail = f"   <code>{esc(run['task_id'])}</code> · {esc(run['agent'])}"
            if run["action"]:
                detail += f" · {esc(clip(run['action'], 100))}"
            link = alerts.run_link(self.base_url, run["run_id"])
            lines.append(f'{detail} · <a href="{esc(link)}">open</a>')
        depth = summary["queue_depth"]
        waiting = sum(depth.values())
        by_priority = ", ".join(f"{n} {p}" for p, n in depth.items() if n)
        lines.append(f"Queue: {waiting} waiting" + (f" ({by_priority})" if by_priority else ""))
        return "\n".join(lines)

    async def _queue_text(self) -> str:
        rows: list[dict[str, Any]] = []
        for state in ("queued", "blocked"):
            rows += await queries.ask(self.nc, "tasks", {"state": state, "limit": 1000})
        if not rows:
            return "The queue is empty."
        rank = {p.value: p.rank for p in t.Priority}
        rows.sort(key=lambda r: (rank.get(r["priority"], 9), r["created_at"]))
        lines = [f"<b>Queue: {len(rows)}</b>"]
        for i, row in enumerate(rows[:QUEUE_ROWS], start=1):
            blocked = " · blocked" if row["state"] == "blocked" else ""
            lines.append(
                f"{i}. [{row['priority']}] {esc(clip(row['title'], 120))} "
                f"<code>{esc(row['task_id'])}</code>{blocked}"
            )
        if len(rows) > QUEUE_ROWS:
            lines.append(f"… and {len(rows) - QUEUE_ROWS} more")
        return "\n".join(lines)

    async def _history_text(self, limit: int) -> str:
        page = await queries.ask(self.nc, "history", {"limit": limit})
        rows = page["rows"]
        if not rows:
            return "No finished builds yet."
        lines = [f"<b>Last {len(rows)} of {page['total']} runs</b>"]
        for row in rows:
            icon = OUTCOME_ICONS.get(row["outcome"], "•")
            why = f" · {esc(clip(row['reason'], 60))}" if row["reason"] else ""
            lines.append(
                f"{icon} {esc(clip(row['title'], 100))} · {duration(row['duration_s'])} · "
                f"{row['turns']} turns · ${row['cost_usd']:.2f}{why} "
                f"<code>{esc(row['task_id'])}</code>"
            )
        return "\n".join(lines)

    async def _inbox_text(self, agent: str) -> str:
        result = await queries.ask(self.nc, "inbox", {"agent": agent, "unread": True})
        messages = result["messages"]
        if not messages:
            return f"No unread messages for {esc(agent)}."
        lines = [f"<b>{esc(agent)}: {result['unread']} unread</b>"]
        for m in messages[-INBOX_ROWS:]:
            about = f" about <code>{esc(m['task_id'])}</code>" if m["task_id"] else ""
            when = datetime.fromisoformat(m["sent_at"]).strftime("%d %b %H:%M")
            lines.append(
                f"• {when} {esc(m['type'])} from <b>{esc(m['sender'])}</b>{about}:\n"
                f"{esc(clip(m['body'], 500))}"
            )
        if len(messages) > INBOX_ROWS:
            lines.append(f"… and {len(messages) - INBOX_ROWS} older; the dashboard has them all")
        return "\n".join(lines)

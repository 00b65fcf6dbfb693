"""The Telegram bot inside ``shipyard up``: alerts to the operator's phone, and commands.

Alerts are derived from the event log, not pushed by whoever caused them. On start the bot
follows the log from the first event newer than ``telegram.horizon``, so after downtime it
sends what it missed. Before sending it checks for an ``alert_delivered`` event on the
alert's own aggregate (derived from channel, chat and source event), and after a send it
appends one create-only: an alert is sent once however often the bot restarts, and however
many instances run. The one gap is a crash between a send and its record, which sends that
alert again — Telegram offers no idempotency key to close it.

Delivery never holds up anything else: it runs in its own task, waits out a 429 for the
``retry_after`` Telegram names, backs off exponentially on other errors, and gives up on an
alert only when Telegram refuses it for good (a blocked bot, an unknown chat).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from aiogram import Bot, Dispatcher
from aiogram.client.default import DefaultBotProperties
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.enums import ParseMode
from aiogram.exceptions import (
    TelegramBadRequest,
    TelegramConflictError,
    TelegramEntityTooLarge,
    TelegramForbiddenError,
    TelegramMigrateToChat,
    TelegramNotFound,
    TelegramRetryAfter,
    TelegramUnauthorizedError,
)
from aiogram.types import InlineKeyboardMarkup
from aiogram.utils.backoff import BackoffConfig
from nats.aio.client import Client as NATS

from shipyard.errors import ShipyardError
from shipyard.events import types as t
from shipyard.events.envelope import Event
from shipyard.events.log import EventLog
from shipyard.gateway import alerts, delivery
from shipyard.gateway.telegram_commands import BotCommands, failure_keyboard
from shipyard.settings import Settings, TelegramSettings

log = logging.getLogger(__name__)

CHANNEL = "telegram"
ACTOR = "telegram"
STOP_TIMEOUT = 3.0  # seconds to let polling wind down before it is cancelled
# Telegram refuses these for good: retrying the same message cannot help.
PERMANENT = (
    TelegramForbiddenError,
    TelegramNotFound,
    TelegramUnauthorizedError,
    TelegramMigrateToChat,
    TelegramEntityTooLarge,
    TelegramConflictError,
)


def alert_id(chat_id: int, source_event: str) -> str:
    """The aggregate that records one alert's delivery to one chat."""
    return delivery.record_id(CHANNEL, str(chat_id), source_event)


def make_bot(settings: TelegramSettings) -> Bot:
    """An aiogram Bot for ``settings``, on another Bot API server if ``api_base`` names one."""
    if settings.api_base:
        session = AiohttpSession(api=TelegramAPIServer.from_base(settings.api_base))
    else:
        session = AiohttpSession()
    session.timeout = settings.request_timeout
    return Bot(
        settings.token.get_secret_value(),
        session=session,
        default=DefaultBotProperties(parse_mode=ParseMode.HTML, link_preview_is_disabled=True),
    )


class Backoff:
    """Exponential delays from ``initial`` to ``cap``; :meth:`reset` after a success."""

    def __init__(self, initial: float, cap: float) -> None:
        self.initial = initial
        self.cap = max(cap, initial)
        self.delay = initial

    async def sleep(self) -> None:
        await asyncio.sleep(self.delay)
        self.delay = min(self.delay * 2, self.cap)

    def reset(self) -> None:
        self.delay = self.initial


class Sender:
    """Sends Telegram HTML to a chat: split to the size limit, retried until it lands."""

    def __init__(self, bot: Bot, settings: TelegramSettings) -> None:
        self.bot = bot
        self.settings = settings

    async def send(self, chat_id: int, text: str, markup: InlineKeyboardMarkup | None) -> bool:
        """True once every part is delivered (the buttons go under the last one); False if
        Telegram refused it for good."""
        parts = alerts.split(text)
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if not await self._send_one(chat_id, part, markup if last else None):
                return False
        return True

    async def _send_one(self, chat_id: int, text: str, markup: InlineKeyboardMarkup | None) -> bool:
        backoff = Backoff(self.settings.retry_initial, self.settings.retry_max)
        as_html = True
        while True:
            try:
                if as_html:
                    await self.bot.send_message(chat_id, text, reply_markup=markup)
                else:
                    await self.bot.send_message(
                        chat_id, alerts.plain(text), reply_markup=markup, parse_mode=None
                    )
                return True
            except TelegramRetryAfter as e:
                # aiogram does not wait out a 429 itself; Telegram says how long to wait.
                log.warning(
                    "telegram: rate limited, retrying in %ss",
                    e.retry_after,
                    extra={"action": "telegram_rate_limited", "retry_after": e.retry_after},
                )
                await asyncio.sleep(e.retry_after)
            except TelegramBadRequest as e:
                if markup is not None:
                    # Telegram refuses some button URLs (a dashboard on loopback, say):
                    # keep the message, lose the link button, then every button.
                    markup = _without_links(markup)
                    log.warning(
                        "telegram: chat %s refused the buttons (%s); sending with fewer",
                        chat_id,
                        e.message,
                        extra={"action": "telegram_buttons_refused", "chat_id": chat_id},
                    )
                    continue
                if as_html:
                    as_html = False  # the last resort: the same words without markup
                    log.warning(
                        "telegram: chat %s refused the markup (%s); sending plain text",
                        chat_id,
                        e.message,
                        extra={"action": "telegram_markup_refused", "chat_id": chat_id},
                    )
                    continue
                log.error(
                    "telegram: chat %s refused a message: %s",
                    chat_id,
                    e.message,
                    extra={"action": "telegram_refused_message", "chat_id": chat_id},
                )
                return False
            except PERMANENT as e:
                log.error(
                    "telegram: cannot send to chat %s: %s",
                    chat_id,
                    e,
                    extra={"action": "telegram_undeliverable", "chat_id": chat_id},
                )
                return False
            except Exception as e:
                log.warning(
                    "telegram: sending to chat %s failed (%s: %s); retrying in %.1fs",
                    chat_id,
                    type(e).__name__,
                    e,
                    backoff.delay,
                    extra={"action": "telegram_send_retry", "chat_id": chat_id},
                )
                await backoff.sleep()


def _without_links(markup: InlineKeyboardMarkup) -> InlineKeyboardMarkup | None:
    rows = [[b for b in row if not b.url] for row in markup.inline_keyboard]
    rows = [row for row in rows if row]
    if not rows or rows == markup.inline_keyboard:
        return None
    return InlineKeyboardMarkup(inline_keyboard=rows)


class TelegramService:
    """The bot as a role of ``shipyard up``: :meth:`start` and :meth:`stop`."""

    def __init__(
        self,
        settings: Settings,
        events: EventLog,
        nc: NATS,
        *,
        dashboard_url: str = "",
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self.settings = settings.telegram
        self.events = events
        self.kinds = frozenset(self.settings.alerts)
        self.base_url = (settings.gateway.public_url or dashboard_url).rstrip("/")
        self.bot = make_bot(self.settings)
        self.sender = Sender(self.bot, self.settings)
        self.commands = BotCommands(
            nc, self.settings, send=self.sender.send, base_url=self.base_url
        )
        self.dispatcher = Dispatcher()
        self.dispatcher.include_router(self.commands.router())
        self.position = 0  # the last event the alerts have been derived from
        self._now = now or (lambda: datetime.now(UTC))
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._alert_loop(), name="telegram-alerts"),
            asyncio.create_task(self._poll_loop(), name="telegram-polling"),
        ]
        log.info(
            "telegram: alerts to %d chat(s): %s",
            len(self.settings.chat_ids),
            ", ".join(sorted(self.kinds)),
            extra={"action": "telegram_started"},
        )

    async def stop(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError):
            # RuntimeError: polling is not running (it is between attempts).
            await asyncio.wait_for(self.dispatcher.stop_polling(), STOP_TIMEOUT)
        for task in self._tasks:
            task.cancel()
        pending: set[asyncio.Task[None]] = set(self._tasks)
        if pending:
            # Bounded: a follower cancelled while its consumer is being set up can linger.
            _, pending = await asyncio.wait(pending, timeout=STOP_TIMEOUT)
        await self.bot.session.close()
        if pending:
            # A straggler that sends after the close opens a new HTTP session: close that too.
            await asyncio.wait(pending, timeout=STOP_TIMEOUT)
            await self.bot.session.close()
        self._tasks = []

    # --- commands: long polling ---------------------------------------------------------

    async def _poll_loop(self) -> None:
        """Poll for updates until stopped; a failure to start (a wrong token, no network)
        is retried, never raised into ``shipyard up``."""
        s = self.settings
        backoff = Backoff(s.retry_initial, s.retry_max)
        config = BackoffConfig(
            min_delay=s.retry_initial,
            max_delay=max(s.retry_max, s.retry_initial * 2),
            factor=2.0,
            jitter=0.1,
        )
        while True:
            try:
                await self.dispatcher.start_polling(
                    self.bot,
                    polling_timeout=s.poll_timeout,
                    handle_signals=False,  # `shipyard up` owns SIGINT and SIGTERM
                    close_bot_session=False,
                    backoff_config=config,
                )
                return
            except Exception as e:
                log.warning(
                    "telegram: polling stopped (%s: %s); starting again in %.1fs",
                    type(e).__name__,
                    e,
                    backoff.delay,
                    extra={"action": "telegram_poll_error"},
                )
                await backoff.sleep()

    # --- alerts: derived from the log ---------------------------------------------------

    async def _alert_loop(self) -> None:
        s = self.settings
        backoff = Backoff(s.retry_initial, s.retry_max)
        start = 0
        while True:
            try:
                if not start:
                    since = self._now() - timedelta(seconds=s.horizon)
                    start = await self.events.seq_at(since)
                async for event in self.events.follow(start=start):
                    await self._consider(event)
                    start = event.seq + 1
                    self.position = event.seq
                    backoff.reset()
            except Exception as e:
                log.warning(
                    "telegram: following the event log failed (%s: %s); again in %.1fs",
                    type(e).__name__,
                    e,
                    backoff.delay,
                    extra={"action": "telegram_follow_error"},
                )
                await backoff.sleep()

    async def _consider(self, event: Event[Any]) -> None:
        kind = alerts.kind_of(event)
        if kind is None or kind not in self.kinds:
            return
        chats = [
            chat
            for chat in self.settings.chat_ids
            if not await delivery.delivered(self.events, CHANNEL, str(chat), event.id)
        ]
        if not chats:
            return
        try:
            alert = await self._render(event, kind)
        except ShipyardError:
            raise  # the log could not be read: try this event again
        except Exception:
            log.exception(
                "telegram: no alert for event %s", event.id, extra={"action": "telegram_render"}
            )
            return
        markup = failure_keyboard(alert.task_id, alert.link) if alert.actions else None
        for chat in chats:
            if await self.sender.send(chat, alert.text, markup):
                await self._record(chat, alert)

    async def _render(self, event: Event[Any], kind: t.AlertKind) -> alerts.Alert:
        history: list[Event[Any]] = []
        titles: dict[str, str] = {}
        if event.aggregate == "task":
            history = await self.events.history("task", event.aggregate_id)
        others: list[str] = []
        if isinstance(event.data, t.TaskEscalated):
            others = [event.data.task_id]
        elif isinstance(event.data, t.GroupFinished):
            others = event.data.tasks[: alerts.GROUP_ROWS]
        for task_id in others:
            titles[task_id] = await self._title(task_id)
        return alerts.render(event, kind, history=history, titles=titles, base_url=self.base_url)

    async def _title(self, task_id: str) -> str:
        history = await self.events.history("task", task_id)
        first = history[0].data if history else None
        return first.title if isinstance(first, t.TaskDispatched) else ""

    async def _record(self, chat_id: int, alert: alerts.Alert) -> None:
        await delivery.record(
            self.events,
            CHANNEL,
            str(chat_id),
            alert.source_event,
            alert.kind.value,
            actor=ACTOR,
        )
        log.info(
            "telegram: %s alert to chat %s",
            alert.kind,
            chat_id,
            extra={"action": "telegram_alert_sent", "kind": alert.kind.value, "chat_id": chat_id},
        )

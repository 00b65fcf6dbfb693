"""Every error Shipyard raises on purpose derives from :class:`ShipyardError`.

Each subclass's docstring is its default message: it says what went wrong and what to
do about it. A user who made a mistake sees that sentence, never a traceback.
"""

from __future__ import annotations


class ShipyardError(Exception):
    """Shipyard could not do that."""

    def __init__(self, message: str | None = None) -> None:
        doc = (type(self).__doc__ or "").strip()
        super().__init__(message or doc)

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(ShipyardError):
    """The settings are not valid: fix the value named in this message."""


class AlreadyRunning(ShipyardError):
    """Another Shipyard already runs on this data directory: stop it, or pass a different
    --data-dir."""


class NotRunning(ShipyardError):
    """No running Shipyard was found: start one with `shipyard up`, or point at a NATS server
    with --nats URL (or SHIPYARD_NATS_URL)."""


class EmbeddedServerError(ShipyardError):
    """The embedded nats-server did not start: see its log for the reason."""


class ConnectionFailed(ShipyardError):
    """Could not reach NATS: check that the server is running and the URL is right."""


class ConcurrencyConflict(ShipyardError):
    """Someone else changed this aggregate first: re-read its history and decide again."""

    def __init__(self, subject: str, expected: int, message: str | None = None) -> None:
        self.subject = subject
        self.expected = expected
        super().__init__(
            message or f"{subject}: expected last sequence {expected}, but it has moved on"
        )


class AppendFailed(ShipyardError):
    """The event log refused the append: the message says why."""


class StreamMissing(ShipyardError):
    """This NATS server holds no Shipyard event stream yet: run `shipyard up` against it once
    (with --nats URL) to create it."""


class UnknownEventType(ShipyardError):
    """An event of a type this version of Shipyard does not know was read: upgrade Shipyard."""


class CommandRejected(ShipyardError):
    """The command was refused: fix each problem listed and send it again."""

    def __init__(
        self, message: str, problems: list[str] | None = None, code: str = "", template: str = ""
    ) -> None:
        self.problems = list(problems or [])
        self.code = code
        self.template = template  # the form to follow, when the command has one
        super().__init__(message)

    def __str__(self) -> str:
        if not self.problems:
            return self.message
        return self.message + "\n" + "\n".join(f"  - {p}" for p in self.problems)


class CommandUnavailable(ShipyardError):
    """No command service answered: is `shipyard up` running with the `commands` role?"""


class NotFound(ShipyardError):
    """Nothing has that id: check it with `shipyard events`."""


class StorageError(ShipyardError):
    """A directory Shipyard keeps data in is full or read-only: free some space or fix its
    permissions, or pass another --data-dir."""

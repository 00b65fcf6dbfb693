"""Links into the Command Center, for messages that leave Shipyard (alerts, webhooks)."""

from __future__ import annotations

from urllib.parse import quote

from shipyard import instance
from shipyard.settings import Settings


def dashboard_url(settings: Settings) -> str:
    """``gateway.public_url`` if set, else the gateway this data dir runs; "" if none."""
    if settings.gateway.public_url:
        return settings.gateway.public_url.rstrip("/")
    info = instance.read_info(settings.data_dir) or {}
    return str(info.get("gateway_url", "")).rstrip("/")


def run_link(settings: Settings, *, run_id: str = "", task_id: str = "") -> str:
    """The dashboard page of a run (or of a task), "" when no dashboard is known."""
    base = dashboard_url(settings)
    if not base:
        return ""
    if run_id:
        return f"{base}/#/?run={quote(run_id)}"
    return f"{base}/#/?task={quote(task_id)}"

"""``shipyard mcp``: an MCP server on stdio, so an agent (Claude Code, any MCP client) can
message other agents, read and answer its inbox, check tasks and — with a dispatcher token —
dispatch and escalate.

Every tool is a call to the HTTP API with the agent's token, so the gateway's roles apply
unchanged: a builder token may message as its own agent and read, nothing more.
"""

from __future__ import annotations

from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from shipyard import __version__
from shipyard.errors import ShipyardError
from shipyard.gateway.client import Api, ApiError

INSTRUCTIONS = """\
Shipyard runs build tasks through an 8-phase pipeline and lets agents talk in threads.
You are agent {agent}. Read your inbox at the start of your work and answer questions and
status requests; follow directives from whoever dispatched your work. Message types: comment,
question, status_request, status_response, directive."""

ANSWER_TYPE = {"status_request": "status_response", "question": "comment"}


def _refusal(e: ApiError, what: str) -> ToolError:
    if e.status == 403:
        return ToolError(f"{what} is not allowed with this agent's token: {e}")
    detail = "; ".join(e.problems) if e.problems else ""
    return ToolError(f"{what} refused: {e}" + (f" ({detail})" if detail else ""))


def build_server(api: Api, agent: str) -> MCPServer:
    server = MCPServer(
        name="shipyard",
        version=__version__,
        instructions=INSTRUCTIONS.format(agent=agent),
    )

    async def call(what: str, method: str, path: str, body: Any = None) -> Any:
        try:
            if method == "GET":
                return await api.get(path)
            return await api.post(path, body)
        except ApiError as e:
            raise _refusal(e, what) from e
        except ShipyardError as e:
            raise ToolError(str(e)) from e

    @server.tool()
    async def send_message(
        to: str,
        body: str,
        type: str = "comment",
        thread_id: str = "",
        reply_to: str = "",
        task_id: str = "",
        priority: str = "normal",
    ) -> dict[str, Any]:
        """Send a message to another agent (or "*" for everyone). type is one of comment,
        question, status_request, status_response, directive. Give thread_id and reply_to to
        answer in a thread; task_id when it is about a task."""
        message = {
            "sender": agent,
            "recipient": to,
            "type": type,
            "body": body,
            "thread_id": thread_id,
            "reply_to": reply_to,
            "task_id": task_id,
            "priority": priority,
        }
        result: dict[str, Any] = await call("sending", "POST", "/api/messages", message)
        return result

    @server.tool()
    async def read_inbox(unread_only: bool = True, mark_read: bool = True) -> dict[str, Any]:
        """Messages to you (and to everyone), oldest first. By default only unread ones,
        which are then marked read."""
        path = f"/api/inbox/{agent}" + ("?unread=1" if unread_only else "")
        found: dict[str, Any] = await call("reading the inbox", "GET", path)
        unread = [m for m in found["messages"] if not m["read"]]
        if mark_read and unread:
            by_thread: dict[str, list[str]] = {}
            for m in unread:
                by_thread.setdefault(m["thread_id"], []).append(m["message_id"])
            for thread, ids in by_thread.items():
                receipt = {"reader": agent, "thread_id": thread, "message_ids": ids}
                await call("marking read", "POST", "/api/messages/read", receipt)
        return {"agent": agent, "messages": found["messages"]}

    @server.tool()
    async def reply(message_id: str, body: str, type: str = "") -> dict[str, Any]:
        """Answer a message in your inbox, in its thread, to its sender. The type defaults
        to status_response for a status_request and comment otherwise."""
        found = await call("reading the inbox", "GET", f"/api/inbox/{agent}")
        original = next((m for m in found["messages"] if m["message_id"] == message_id), None)
        if original is None:
            raise ToolError(f"no message {message_id} in {agent}'s inbox")
        return await send_message(
            to=original["sender"],
            body=body,
            type=type or ANSWER_TYPE.get(original["type"], "comment"),
            thread_id=original["thread_id"],
            reply_to=message_id,
            task_id=original["task_id"],
        )

    @server.tool()
    async def task_status(task_id: str) -> dict[str, Any]:
        """A task's state, attempt and reason, and each of its runs with phase and percent."""
        found: dict[str, Any] = await call("reading the task", "GET", f"/api/tasks/{task_id}")
        task = found["task"]
        runs = [
            {
                key: run.get(key)
                for key in ("run_id", "state", "phase", "percent", "action", "turns", "reason")
            }
            for run in found["runs"]
        ]
        keep = ("task_id", "title", "state", "attempt", "agent", "reason", "escalated_to")
        return {**{k: task.get(k) for k in keep}, "runs": runs}

    @server.tool()
    async def dispatch(request: dict[str, Any]) -> dict[str, Any]:
        """Put a build task on the queue: the dispatch protocol's JSON (request_type,
        action, action_name, payload with prompt, dispatcher, task_title). The prompt needs
        ## Task, ## Requirements, ## Environment (Working directory) and ## Deliverables
        (with README.md). Needs a dispatcher token."""
        result: dict[str, Any] = await call("dispatching", "POST", "/api/dispatch", request)
        return {"task_id": result["task_id"], "duplicate": result["duplicate"]}

    @server.tool()
    async def escalate(task_id: str, to: str, note: str = "") -> dict[str, Any]:
        """Hand a failed or cancelled task to another agent; it is told what went wrong.
        Needs a dispatcher token."""
        body = {"to": to, "note": note}
        result: dict[str, Any] = await call(
            "escalating", "POST", f"/api/tasks/{task_id}/escalate", body
        )
        return result

    return server


async def serve(api: Api, agent: str) -> None:
    await build_server(api, agent).run_stdio_async()

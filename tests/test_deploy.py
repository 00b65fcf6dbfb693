"""docker-compose.yml and the Dockerfile describe a deployment Shipyard can really run."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from shipyard import runtime
from shipyard import settings as settings_mod
from shipyard.cli import build_parser

ROOT = Path(__file__).parent.parent


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def shipyard_services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in doc["services"].items()
        if str(svc.get("image", "")).startswith("shipyard")
    }


def test_every_command_is_a_real_shipyard_command() -> None:
    """Each Shipyard service runs `shipyard up` with flags the CLI accepts and roles it knows;
    together they run every role but the optional bot, with two handlers."""
    services = shipyard_services(compose())
    assert len(services) >= 3
    roles: list[str] = []
    for name, svc in services.items():
        command = svc["command"]
        assert command[0] == "shipyard", name
        args = build_parser().parse_args(command[1:])
        assert args.command == "up", name
        roles += runtime.parse_roles(args.roles)
    assert roles.count("handler") == 2
    assert set(roles) >= {"projector", "commands", "handler", "gateway", "openclaw"}


def test_the_environment_is_valid_settings() -> None:
    """Each Shipyard service's environment loads as settings: three NATS URLs, the stream
    replicated three times, the data dir on a named volume."""
    doc = compose()
    for name, svc in shipyard_services(doc).items():
        env = {
            k: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(v))
            for k, v in svc["environment"].items()
        }
        loaded = settings_mod.load(env=env)
        assert len(loaded.nats_url) == 3, name
        assert loaded.stream_replicas == 3, name
        data_volume = next(v for v in svc["volumes"] if v.endswith(":" + str(loaded.data_dir)))
        assert data_volume.split(":")[0] in doc["volumes"], name


def test_the_nats_cluster_has_three_jetstream_nodes_with_routes_and_volumes() -> None:
    """Three nats-server nodes, each with JetStream on a named volume, in one cluster whose
    routes name the two others."""
    doc = compose()
    nodes = {name: svc for name, svc in doc["services"].items() if name.startswith("nats-")}
    assert len(nodes) == 3
    for name, svc in nodes.items():
        command = svc["command"]
        assert "-js" in command
        store = command[command.index("-sd") + 1]
        assert any(v == f"{name}:{store}" for v in svc["volumes"])
        routes = command[command.index("--routes") + 1].split(",")
        assert sorted(r.split("//")[1].split(":")[0] for r in routes) == sorted(
            n for n in nodes if n != name
        )
        assert svc["healthcheck"]["test"][0] == "CMD"


def test_the_gateway_is_published_on_loopback_only() -> None:
    """The dashboard port is published on 127.0.0.1 of the host, not on every interface."""
    ports = compose()["services"]["gateway"]["ports"]
    assert ports and all(p.startswith("127.0.0.1:") for p in ports)


def test_the_dockerfile_installs_shipyard_and_runs_as_a_user() -> None:
    """The image installs this package and does not run as root."""
    text = (ROOT / "Dockerfile").read_text()
    assert "pip install --no-cache-dir ." in text
    assert re.search(r"^USER shipyard$", text, re.MULTILINE)

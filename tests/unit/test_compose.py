"""Static checks of docker/: no Docker engine runs here, so the compose file is validated as data."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer.main
import yaml

from agman_milvus.app.cli import app
from agman_milvus.core.config import Settings

DOCKER = Path(__file__).resolve().parents[2] / "docker"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


def settings_env_names() -> set[str]:
    names = set()
    for name, field in Settings.model_fields.items():
        names.add(f"AGMAN_{name.upper()}")
        alias = field.validation_alias
        names.update(getattr(alias, "choices", []) if alias is not None else [])
    return names


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return env


def test_services_present(compose) -> None:
    assert {"etcd", "minio", "standalone", "redis", "postgres", "migrate", "worker-gpu", "worker-cpu"} <= set(
        compose["services"]
    )


def test_every_image_is_pinned(compose) -> None:
    for name, service in compose["services"].items():
        image = service["image"]
        assert re.search(r":[\w.\-]+$", image), f"{name}: image {image!r} has no tag"
        assert not image.endswith(":latest"), f"{name}: image {image!r} is not pinned"
    base = re.search(r"^FROM (\S+)", (DOCKER / "Dockerfile").read_text(), re.M).group(1)
    assert re.search(r":\d+\.\d+\.\d+", base), base


def test_pymilvus_matches_the_milvus_server(compose) -> None:
    server = re.search(r":v(\d+\.\d+)\.", compose["services"]["standalone"]["image"]).group(1)
    pinned = re.search(r"^pymilvus==(\d+\.\d+)\.", (DOCKER / "constraints.txt").read_text(), re.M).group(1)
    assert pinned == server


def test_health_checks_and_dependencies(compose) -> None:
    services = compose["services"]
    for name in ("etcd", "minio", "standalone", "redis", "postgres"):
        assert services[name]["healthcheck"]["test"], name
    for worker in ("worker-gpu", "worker-cpu"):
        depends = services[worker]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert all(depends[s]["condition"] == "service_healthy" for s in ("standalone", "redis", "postgres"))


def test_environment_variables_are_settings(compose) -> None:
    known = settings_env_names()
    for name, service in compose["services"].items():
        for key in environment(service):
            if key.startswith("AGMAN_"):
                assert key in known, f"{name} sets {key}, which Settings does not read"
    worker_env = environment(compose["services"]["worker-gpu"])
    settings = Settings(**{k[len("AGMAN_"):].lower(): v for k, v in worker_env.items()})
    assert not settings.embedded and settings.broker_url.startswith("redis://")


def click_command(*path: str):
    command = typer.main.get_command(app)
    for part in path:
        command = command.commands[part]
    return command


def test_commands_match_the_cli(compose) -> None:
    assert compose["services"]["migrate"]["command"][:3] == ["agman", "db", "upgrade"]
    click_command("db", "upgrade")
    worker = click_command("worker")
    options = {opt for param in worker.params for opt in getattr(param, "opts", [])}
    for name in ("worker-gpu", "worker-cpu"):
        command = compose["services"][name]["command"]
        assert command[:2] == ["agman", "worker"]
        for token in command[2:]:
            if token.startswith("--"):
                assert token in options, f"{name}: `agman worker` has no option {token}"


def test_gpu_worker_reserves_one_gpu(compose) -> None:
    devices = compose["services"]["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert len(devices[0]["device_ids"]) == 1
    command = compose["services"]["worker-gpu"]["command"]
    assert command[command.index("--concurrency") + 1] == "1" and "solo" in command


def test_redis_persists_queued_work(compose) -> None:
    """Queued and unacknowledged tasks survive a Redis restart: append-only file on a volume."""
    redis = compose["services"]["redis"]
    command = redis["command"]
    command = command if isinstance(command, list) else command.split()
    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(volume.split(":")[-1] == "/data" for volume in redis["volumes"])

"""compose.yaml: valid Compose, and the stack a GPU host needs (issue 7).

Validation has two layers. Always: Compose's own interpolation applied here, then the Compose
Specification JSON schema (vendored in compose_spec/, the schema Docker Compose v2 validates with), then
the structural checks below. In addition, when a real Compose implementation is on PATH (the
``docker compose`` plugin, or ``docker-compose`` such as Debian's package), ``config`` is run with it and
the same structural checks are applied to what it prints. Set VLM_TEST_COMPOSE to a compose binary to
use one that is not on PATH.

The flags compose.yaml passes to each program are parsed by that program's own argument parser, so a
renamed or mistyped flag fails here rather than on a GPU host.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.deploy_files import (
    COMPOSE_FILE,
    COMPOSE_SCHEMA,
    REPO_ROOT,
    InterpolationError,
    load_compose,
    parse_dockerfile,
)

GPU_SERVICES = ("encoder", "llm")
MODEL_TARGET = "/models/checkpoint"


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "checkpoint"
    directory.mkdir()
    (directory / "config.json").write_text("{}")
    return directory


@pytest.fixture
def compose(model_dir: Path) -> dict[str, Any]:
    return load_compose({"MODEL_DIR": str(model_dir)})


# ---- helpers that read both this file's form and the normalized form `config` prints ----------------------


def flag_value(command: list[str], flag: str) -> str | None:
    """The value of ``--flag=value`` or ``--flag value`` in an argv list (the last one wins)."""
    value = None
    for i, arg in enumerate(command):
        if arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
        elif arg == flag and i + 1 < len(command):
            value = command[i + 1]
    return value


def healthcheck_argv(service: dict[str, Any]) -> list[str]:
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        test = ["CMD-SHELL", test]
    kind, *rest = test
    assert kind in ("CMD", "CMD-SHELL"), test
    return shlex.split(rest[0]) if kind == "CMD-SHELL" else rest


def published_ports(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(published host port or range, container port) of each mapping, short or long syntax."""
    mappings = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            mappings.append((str(port.get("published", "")), str(port["target"])))
        else:
            spec = str(port).split("/")[0]
            host_part, _, target = spec.rpartition(":")
            mappings.append((host_part.rpartition(":")[2], target))
    return mappings


def depends_condition(service: dict[str, Any], on: str) -> str | None:
    depends = service.get("depends_on", {})
    if isinstance(depends, list):
        return "service_started" if on in depends else None
    entry = depends.get(on)
    return None if entry is None else entry.get("condition", "service_started")


def check_stack(compose: dict[str, Any], model_dir: Path) -> None:
    """What the deployment issue asks of compose.yaml, on either form of the file."""
    services = compose["services"]
    assert set(GPU_SERVICES) <= set(services)
    ports = {}
    for name in GPU_SERVICES:
        service = services[name]
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), name
        assert all(d.get("device_ids") for d in devices), f"{name}: GPU ids must be chosen (device_ids)"

        assert service.get("restart") in ("unless-stopped", "always", "on-failure"), name
        assert "container_name" not in service, f"{name}: a fixed container name prevents --scale"

        mounts = [v for v in service["volumes"] if isinstance(v, dict)] or [
            dict(zip(("source", "target", "mode"), v.split(":"), strict=False)) for v in service["volumes"]
        ]
        model_mounts = [m for m in mounts if m.get("target") == MODEL_TARGET]
        assert len(model_mounts) == 1, f"{name}: the checkpoint must be mounted at {MODEL_TARGET}"
        mount = model_mounts[0]
        assert mount.get("read_only") is True or mount.get("mode") == "ro", (
            f"{name}: models are mounted read-only"
        )
        assert Path(mount["source"]) == model_dir

        command = service["command"]
        assert flag_value(command, "--model") == MODEL_TARGET
        assert flag_value(command, "--host") == "0.0.0.0", (
            f"{name}: must listen beyond the container's loopback"
        )
        assert flag_value(command, "--device") == "cuda"
        port = flag_value(command, "--port")
        assert port is not None and port.isdigit(), name
        ports[name] = port

        probe = healthcheck_argv(service)
        assert probe[0] == "vlm-health-probe", f"{name}: health check must use the gRPC health probe"
        assert flag_value(probe, "--address") == f"127.0.0.1:{port}"
        assert probe[-3:] == ["||", "exit", "1"], "Docker reserves health check exit status 2"
        assert service["healthcheck"].get("start_period"), f"{name}: loading weights needs a start period"

        assert [target for _, target in published_ports(service)] == [port], name

    assert depends_condition(services["llm"], "encoder") == "service_healthy"
    assert flag_value(services["llm"]["command"], "--encoder-address") == f"encoder:{ports['encoder']}"

    # --scale encoder=N: each replica needs its own host port, so the encoder publishes a range that
    # leaves the llm's host port alone.
    ((encoder_host, _),) = published_ports(services["encoder"])
    ((llm_host, _),) = published_ports(services["llm"])
    match = re.fullmatch(r"(\d+)-(\d+)", encoder_host)
    assert match, f"the encoder must publish a host port range, got {encoder_host!r}"
    first, last = int(match.group(1)), int(match.group(2))
    assert last - first >= 3, "room for a few encoder replicas"
    assert not first <= int(llm_host) <= last


def check_client(compose: dict[str, Any]) -> None:
    services = compose["services"]
    client = services["client"]
    assert client["profiles"] == ["client"]
    assert depends_condition(client, "llm") == "service_healthy"
    encoder_port = flag_value(services["encoder"]["command"], "--port")
    llm_port = flag_value(services["llm"]["command"], "--port")
    environment = client["environment"]
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    # dns:/// so that a round_robin channel sees every encoder replica.
    assert environment["VLM_ENCODER_ADDR"] == f"dns:///encoder:{encoder_port}"
    assert environment["VLM_LLM_ADDR"] == f"llm:{llm_port}"
    assert "deploy" not in client, "the client needs no GPU"


# ---- this file, interpolated here -----------------------------------------------------------------------


def test_compose_file_matches_the_compose_specification_schema(model_dir):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    overrides = {
        "ENCODER_GPU_IDS": "1",
        "LLM_GPU_IDS": "2",
        "ENCODER_HOST_PORTS": "7001-7009",
        "LLM_HOST_PORT": "7000",
        "VLM_PUBLISH_ADDRESS": "0.0.0.0",
        "LLM_KV_CACHE": "--num-kv-blocks=4096",
    }
    for env in ({"MODEL_DIR": str(model_dir)}, {"MODEL_DIR": str(model_dir), **overrides}):
        errors = sorted(validator.iter_errors(load_compose(env)), key=lambda e: list(e.absolute_path))
        assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_compose_declares_the_gpu_stack(compose, model_dir):
    check_stack(compose, model_dir)
    check_client(compose)


def test_model_dir_is_required():
    with pytest.raises(InterpolationError, match="MODEL_DIR"):
        load_compose({})


def test_settings_come_from_the_environment(model_dir):
    compose = load_compose(
        {
            "MODEL_DIR": str(model_dir),
            "ENCODER_GPU_IDS": "2",
            "LLM_GPU_IDS": "3",
            "ENCODER_HOST_PORTS": "7001-7009",
            "LLM_HOST_PORT": "7000",
            "ENCODER_MAX_BATCH_SIZE": "32",
            "LLM_KV_CACHE": "--num-kv-blocks=4096",
            "LLM_MAX_NUM_SEQS": "128",
            "VLM_IMAGE_TAG": "v1",
        }
    )
    check_stack(compose, model_dir)
    encoder, llm = compose["services"]["encoder"], compose["services"]["llm"]
    assert encoder["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["2"]
    assert llm["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["3"]
    assert published_ports(encoder) == [("7001-7009", "50051")]
    assert published_ports(llm) == [("7000", "50052")]
    assert flag_value(encoder["command"], "--max-batch-size") == "32"
    assert flag_value(llm["command"], "--num-kv-blocks") == "4096"
    assert flag_value(llm["command"], "--kv-memory-fraction") is None
    assert flag_value(llm["command"], "--max-num-seqs") == "128"
    assert encoder["image"].endswith(":v1")


def _bytes(size: str) -> int:
    number, unit = re.fullmatch(r"(\d+)\s*([kmg]?)b?", str(size).lower()).groups()
    return int(number) * 1024 ** " kmg".index(unit or " ")


def test_shared_memory_transport_is_wired(model_dir):
    for env, ring_mib, shm_size in (
        ({}, 512, "1gb"),
        ({"ENCODER_SHARED_MEMORY_MB": "1536", "ENCODER_SHM_SIZE": "2g"}, 1536, "2g"),
    ):
        services = load_compose({"MODEL_DIR": str(model_dir), **env})["services"]
        encoder, llm = services["encoder"], services["llm"]
        assert flag_value(encoder["command"], "--shared-memory-mb") == str(ring_mib)
        assert encoder["ipc"] == "shareable" and llm["ipc"] == "service:encoder"
        assert encoder["shm_size"] == shm_size
        assert _bytes(encoder["shm_size"]) > ring_mib * 1024**2, "/dev/shm must hold the ring"
        assert depends_condition(llm, "encoder") == "service_healthy"  # ipc: service:encoder needs it
    services = load_compose({"MODEL_DIR": str(model_dir), "ENCODER_SHARED_MEMORY_MB": "0"})["services"]
    assert flag_value(services["encoder"]["command"], "--shared-memory-mb") == "0"


def test_published_ports_bind_to_loopback_by_default(compose):
    for name in GPU_SERVICES:
        for port in compose["services"][name]["ports"]:
            assert str(port).startswith("127.0.0.1:"), f"{name}: plaintext gRPC stays on the host by default"


def test_services_build_from_the_dockerfile_targets(compose):
    stages = parse_dockerfile().stages
    for name, service in compose["services"].items():
        build = service["build"]
        assert (REPO_ROOT / build["context"] / build["dockerfile"]).is_file()
        assert build["target"] in stages, f"{name}: no stage {build['target']!r} in the Dockerfile"
        assert build["target"] == name


# ---- the flags reach real argument parsers ----------------------------------------------------------------


def _with_model(command: list[str], model_dir: Path) -> list[str]:
    return [f"--model={model_dir}" if arg.startswith("--model=") else arg for arg in command]


@pytest.mark.parametrize(
    "env",
    [
        {},
        {
            "LLM_KV_CACHE": "--num-kv-blocks=4096",
            "ENCODER_CACHE_BYTES": "0",
            "LLM_EMBEDDING_CACHE_BYTES": "512MiB",
        },
    ],
    ids=["defaults", "overrides"],
)
def test_service_flags_are_accepted_by_the_services(model_dir, env):
    from encoder_service.__main__ import parse_config as parse_encoder_config
    from llm_service.__main__ import build_parser as build_llm_parser
    from llm_service.__main__ import config_from_args as llm_config_from_args

    services = load_compose({"MODEL_DIR": str(model_dir), **env})["services"]

    encoder_config, _ = parse_encoder_config(
        _with_model(services["encoder"]["command"], model_dir), environ={}
    )
    assert encoder_config.device == "cuda" and encoder_config.server.port == 50051

    args = build_llm_parser().parse_args(_with_model(services["llm"]["command"], model_dir))
    llm_config = llm_config_from_args(args)
    assert llm_config.device == "cuda" and llm_config.port == 50052
    assert llm_config.encoder_address == "encoder:50051"
    assert encoder_config.shared_memory_bytes == 512 * 1024**2 and llm_config.accept_shared_memory


def test_client_and_probe_flags_are_accepted(compose):
    from client_sdk.cli import build_parser as build_client_parser
    from vlm_protocol.health_probe import build_parser as build_probe_parser

    args = build_client_parser().parse_args(compose["services"]["client"]["command"])
    assert args.text and args.streaming
    for name in GPU_SERVICES:
        probe = healthcheck_argv(compose["services"][name])
        build_probe_parser().parse_args(probe[1:-3])


# ---- a real Compose implementation, when one is here ----------------------------------------------------


def _compose_commands() -> list[Any]:
    commands: list[Any] = []
    explicit = os.environ.get("VLM_TEST_COMPOSE")
    if explicit:
        commands.append(pytest.param([explicit], id=Path(explicit).name))
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        commands.append(pytest.param([docker, "compose"], id="docker-compose-plugin"))
    legacy = shutil.which("docker-compose")
    if legacy:
        commands.append(pytest.param([legacy], id="docker-compose"))
    if not commands:
        commands.append(
            pytest.param(
                None,
                id="none",
                marks=pytest.mark.skip(
                    reason="no Compose implementation on PATH (docker compose, docker-compose); "
                    "the schema and structural tests above still ran"
                ),
            )
        )
    return commands


def _run_compose(
    command: list[str], env: dict[str, str], tmp_path: Path, *args: str
) -> subprocess.CompletedProcess:
    empty_env_file = tmp_path / "empty.env"  # never read a developer's .env beside compose.yaml
    empty_env_file.write_text("")
    base_env = {key: os.environ[key] for key in ("PATH", "HOME", "LANG") if key in os.environ}
    return subprocess.run(
        [*command, "--env-file", str(empty_env_file), "-f", str(COMPOSE_FILE), *args],
        env={**base_env, **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("command", _compose_commands())
def test_real_compose_accepts_the_file(command, model_dir, tmp_path):
    result = _run_compose(command, {"MODEL_DIR": str(model_dir)}, tmp_path, "--profile", "client", "config")
    assert result.returncode == 0, result.stderr
    normalized = yaml.safe_load(result.stdout)
    check_stack(normalized, model_dir)
    check_client(normalized)

    result = _run_compose(command, {"MODEL_DIR": str(model_dir)}, tmp_path, "config", "--services")
    assert result.returncode == 0, result.stderr
    assert set(GPU_SERVICES) <= set(result.stdout.split())


@pytest.mark.parametrize("command", _compose_commands())
def test_real_compose_refuses_a_missing_model_dir(command, tmp_path):
    result = _run_compose(command, {}, tmp_path, "config")
    assert result.returncode != 0
    assert "MODEL_DIR" in result.stderr

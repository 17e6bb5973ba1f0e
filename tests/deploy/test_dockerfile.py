"""docker/Dockerfile and .dockerignore, read without a Docker engine (issue 7).

Each service image: a CUDA PyTorch base, the project installed from a wheel (never editable) without
touching the base image's torch, a numeric non-root user, a HEALTHCHECK through vlm-health-probe,
STOPSIGNAL SIGTERM and an exec-form ENTRYPOINT/CMD whose flags the service's own parser accepts.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest

from tests.deploy.deploy_files import (
    REPO_ROOT,
    Dockerfile,
    dockerignore_patterns,
    is_ignored,
    parse_dockerfile,
)

SERVICE_TARGETS = {"encoder": ("vlm-encoder", "50051"), "llm": ("vlm-llm", "50052")}
IMAGE_TARGETS = (*SERVICE_TARGETS, "client")


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile()


def _runs(dockerfile: Dockerfile, stage: str) -> list[str]:
    return [i.args for i in dockerfile.stages[stage].instructions if i.keyword == "RUN"]


def test_base_image_is_cuda_pytorch_of_a_supported_version(dockerfile):
    base = dockerfile.global_args["BASE_IMAGE"]
    match = re.fullmatch(
        r"pytorch/pytorch:(\d+)\.(\d+)\.(\d+)-cuda(\d+)\.(\d+)-cudnn\d+-(runtime|devel)", base
    )
    assert match, f"BASE_IMAGE should be an official CUDA PyTorch image, got {base!r}"
    assert (int(match.group(1)), int(match.group(2))) >= (2, 6), "pyproject's serve extra needs torch >= 2.6"
    assert dockerfile.stages["runtime"].base == "${BASE_IMAGE}"
    for target in SERVICE_TARGETS:
        assert dockerfile.chain(target)[-1].name == "runtime"


@pytest.mark.parametrize("target", IMAGE_TARGETS)
def test_images_run_as_a_numeric_non_root_user(dockerfile, target):
    user = dockerfile.effective(target, "USER")
    assert user is not None, f"{target}: no USER, the image would run as root"
    uid, _, gid = user.args.partition(":")
    # Numeric, so Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
    assert uid.isdigit() and int(uid) >= 1000, user.args
    assert not gid or (gid.isdigit() and int(gid) != 0), user.args


@pytest.mark.parametrize("target", IMAGE_TARGETS)
def test_entrypoint_is_exec_form_and_signals_reach_python(dockerfile, target):
    entrypoint = dockerfile.effective(target, "ENTRYPOINT")
    assert entrypoint is not None and entrypoint.exec_form, f"{target}: ENTRYPOINT must be a JSON array"
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint.exec_form[0] in scripts, f"{target}: entrypoint should be one of the console scripts"
    cmd = dockerfile.stages[target].last("CMD")
    assert cmd is not None and cmd.exec_form is not None, f"{target}: CMD must be a JSON array"
    stop = dockerfile.effective(target, "STOPSIGNAL")
    assert stop is not None and stop.args == "SIGTERM"


@pytest.mark.parametrize("target", SERVICE_TARGETS)
def test_service_images_have_a_grpc_health_check(dockerfile, target):
    script, port = SERVICE_TARGETS[target]
    assert dockerfile.effective(target, "ENTRYPOINT").exec_form == (script,)
    healthcheck = dockerfile.effective(target, "HEALTHCHECK")
    assert healthcheck is not None, f"{target}: no HEALTHCHECK"
    assert any(flag.startswith("--start-period=") for flag in healthcheck.flags), (
        "weights take a while to load"
    )
    kind, _, command = healthcheck.args.partition(" ")
    assert kind == "CMD"
    argv = shlex.split(command)
    assert argv[0] == "vlm-health-probe"
    assert argv[-3:] == ["||", "exit", "1"], "Docker reserves health check exit status 2"
    address = argv[argv.index("--address") + 1]
    env = dockerfile.env(target)
    assert address == "${VLM_PROBE_ADDRESS}" and env["VLM_PROBE_ADDRESS"] == f"127.0.0.1:{port}"

    cmd = list(dockerfile.stages[target].last("CMD").exec_form)
    assert cmd[cmd.index("--port") + 1] == port
    expose = dockerfile.stages[target].last("EXPOSE")
    assert expose is not None and expose.args == port


def test_service_cmd_flags_are_accepted_by_the_services(dockerfile, tmp_path):
    from encoder_service.__main__ import parse_config as parse_encoder_config
    from llm_service.__main__ import build_parser as build_llm_parser
    from llm_service.__main__ import config_from_args as llm_config_from_args
    from vlm_protocol.health_probe import build_parser as build_probe_parser

    (tmp_path / "config.json").write_text("{}")

    def with_model(target: str) -> list[str]:
        cmd = list(dockerfile.stages[target].last("CMD").exec_form)
        assert cmd[cmd.index("--model") + 1] == "/models/checkpoint"
        cmd[cmd.index("--model") + 1] = str(tmp_path)
        return cmd

    encoder_config, _ = parse_encoder_config(with_model("encoder"), environ={})
    assert encoder_config.device == "cuda" and encoder_config.server.host == "0.0.0.0"
    llm_config = llm_config_from_args(build_llm_parser().parse_args(with_model("llm")))
    assert llm_config.device == "cuda" and llm_config.host == "0.0.0.0"

    for target in SERVICE_TARGETS:
        argv = shlex.split(dockerfile.effective(target, "HEALTHCHECK").args.partition(" ")[2])
        address = dockerfile.env(target)["VLM_PROBE_ADDRESS"]
        build_probe_parser().parse_args([address if a == "${VLM_PROBE_ADDRESS}" else a for a in argv[1:-3]])


def test_project_is_installed_from_a_wheel_keeping_the_base_torch(dockerfile):
    assert any(re.search(r"\bpip wheel\b.*--no-deps", run) for run in _runs(dockerfile, "wheel"))
    installs = [run for run in _runs(dockerfile, "runtime") if "pip install" in run]
    assert len(installs) == 1
    install = installs[0]
    assert "[serve]" in install and ".whl" in install
    assert "--constraint" in install and "torch==" in install, "pin the base image's torch while installing"
    all_runs = [run for stage in dockerfile.stages for run in _runs(dockerfile, stage)]
    assert not any(re.search(r"pip install\b.*(\s-e\s|--editable)", run) for run in all_runs)
    client_installs = [run for run in _runs(dockerfile, "client") if "pip install" in run]
    assert client_installs and not any("[serve]" in run for run in client_installs), (
        "the client needs no torch"
    )
    # Only the wheel crosses into the runtime images, not the sources.
    for target in IMAGE_TARGETS:
        for stage in dockerfile.chain(target):
            for instruction in stage.instructions:
                if instruction.keyword in ("COPY", "ADD"):
                    assert "--from=wheel" in instruction.flags, f"{stage.name}: {instruction.args}"


def test_models_are_not_baked_into_the_images(dockerfile):
    for stage in dockerfile.stages.values():
        for instruction in stage.instructions:
            assert instruction.keyword != "VOLUME", "compose and Kubernetes mount /models read-only"
            if instruction.keyword in ("COPY", "ADD"):
                assert "/models" not in instruction.args


@pytest.mark.parametrize(
    "path",
    [
        "pyproject.toml",
        "README.md",
        "protos/gen/python/vlm/v1/llm_service_pb2.py",
        "vlm_protocol/health_probe.py",
        "encoder_service/__main__.py",
        "llm_service/__main__.py",
        "client_sdk/cli.py",
        "vlm_demo/sample_image.py",
    ],
)
def test_dockerignore_keeps_what_the_wheel_needs(path):
    assert (REPO_ROOT / path).exists(), path
    assert not is_ignored(path, dockerignore_patterns())


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        "node_modules/x/index.js",
        "tests/unit/test_sampler.py",
        "vlm_protocol/__pycache__/x.pyc",
        "tiny_models/llava/model.safetensors",
        "vlm_serving.egg-info/PKG-INFO",
        ".env",
    ],
)
def test_dockerignore_leaves_out_the_rest(path):
    assert is_ignored(path, dockerignore_patterns())


def test_parser_reads_continuations_and_stages(tmp_path):
    path = Path(tmp_path / "Dockerfile")
    path.write_text(
        "# syntax=docker/dockerfile:1\nARG BASE=x:1\nFROM ${BASE} AS one\nENV A=1 \\\n    B=2\n"
        "# a comment\nRUN echo a \\\n    && echo b\nUSER 1000\nFROM one AS two\nENV C 3\n"
        'CMD ["--x", "1"]\nHEALTHCHECK --interval=5s CMD true\n'
    )
    parsed = parse_dockerfile(path)
    assert parsed.global_args == {"BASE": "x:1"}
    assert [s.name for s in parsed.chain("two")] == ["two", "one"]
    assert parsed.env("two") == {"A": "1", "B": "2", "C": "3"}
    assert parsed.effective("two", "USER").args == "1000"
    assert parsed.stages["one"].last("RUN").args == "echo a && echo b"
    assert parsed.effective("two", "CMD").exec_form == ("--x", "1")
    assert parsed.effective("two", "HEALTHCHECK").flags == ("--interval=5s",)

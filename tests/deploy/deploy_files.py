"""Readers for the deployment files, for tests on a machine without a Docker engine.

``load_compose`` applies Compose's variable interpolation (``${VAR:-default}`` and friends) to
``compose.yaml`` the way ``docker compose config`` does, so tests see the file as a GPU host would.
``parse_dockerfile`` splits ``docker/Dockerfile`` into stages and instructions (continuations joined,
comments dropped, JSON "exec form" decoded) and resolves what a target stage inherits.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "compose.yaml"
DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
COMPOSE_SCHEMA = Path(__file__).resolve().parent / "compose_spec" / "compose-spec.json"

# ${NAME}, ${NAME<op>arg} with op one of :- - :? ? :+ +, $NAME, and $$ (a literal dollar).
_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


class InterpolationError(ValueError):
    """A required variable (``${NAME:?message}``) has no value."""


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's interpolation of one string value (no nesting, as compose.yaml uses none)."""

    def substitute(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        name = match.group("braced") or match.group("bare")
        op, arg = match.group("op"), match.group("arg") or ""
        value = env.get(name)
        is_set, is_nonempty = value is not None, bool(value)
        present = is_nonempty if op and op.startswith(":") else is_set
        if op in (":-", "-"):
            return value if present else arg  # type: ignore[return-value]
        if op in (":?", "?"):
            if not present:
                raise InterpolationError(f"required variable {name} is missing a value: {arg}")
            return value  # type: ignore[return-value]
        if op in (":+", "+"):
            return arg if present else ""
        return value or ""

    return _VARIABLE.sub(substitute, text)


def interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    """Interpolate every string value (not keys) of a parsed YAML document."""
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_tree(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolate_tree(value, env) for key, value in node.items()}
    return node


def load_compose(env: Mapping[str, str], path: Path = COMPOSE_FILE) -> dict[str, Any]:
    """compose.yaml as Compose sees it under ``env``: merge keys resolved, variables substituted."""
    return interpolate_tree(yaml.safe_load(path.read_text()), env)


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction. ``exec_form`` is the decoded JSON array, when the arguments are one."""

    keyword: str
    flags: tuple[str, ...]
    args: str
    exec_form: tuple[str, ...] | None


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def last(self, keyword: str) -> Instruction | None:
        found = [i for i in self.instructions if i.keyword == keyword]
        return found[-1] if found else None


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: dict[str, Stage]

    def chain(self, target: str) -> list[Stage]:
        """The stage and the stages it is built FROM, nearest first."""
        chain = [self.stages[target]]
        while chain[-1].base in self.stages:
            chain.append(self.stages[chain[-1].base])
        return chain

    def effective(self, target: str, keyword: str) -> Instruction | None:
        """The instruction of that kind in force in ``target`` (its own, else inherited)."""
        for stage in self.chain(target):
            found = stage.last(keyword)
            if found is not None:
                return found
        return None

    def env(self, target: str) -> dict[str, str]:
        """ENV values in force in ``target`` (both ``K=V ...`` and ``K V`` forms)."""
        values: dict[str, str] = {}
        for stage in reversed(self.chain(target)):
            for instruction in stage.instructions:
                if instruction.keyword != "ENV":
                    continue
                tokens = shlex.split(instruction.args)
                if tokens and "=" not in tokens[0]:
                    values[tokens[0]] = " ".join(tokens[1:])
                else:
                    values.update(token.split("=", 1) for token in tokens)
        return values


def parse_dockerfile(path: Path = DOCKERFILE) -> Dockerfile:
    """Stages and instructions of a Dockerfile (no heredocs; the project's file uses none)."""
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for logical in _logical_lines(path.read_text()):
        keyword, _, rest = logical.partition(" ")
        keyword = keyword.upper()
        flags: list[str] = []
        rest = rest.strip()
        while keyword in ("FROM", "COPY", "ADD", "RUN", "HEALTHCHECK") and rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            flags.append(flag)
            rest = rest.strip()
        exec_form = None
        if keyword in ("ENTRYPOINT", "CMD", "RUN", "SHELL") and rest.startswith("["):
            decoded = json.loads(rest)
            exec_form = tuple(decoded)
        instruction = Instruction(keyword, tuple(flags), rest, exec_form)
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else f"stage-{len(stages)}"
            current = stages[name] = Stage(name=name, base=words[0])
        elif current is None:
            if keyword == "ARG":
                key, _, value = rest.partition("=")
                global_args[key] = value
        else:
            current.instructions.append(instruction)
    return Dockerfile(global_args, stages)


def _logical_lines(text: str) -> list[str]:
    """Instructions with their continuation lines joined; comment lines and blank lines dropped."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        lines.append((pending + stripped).strip())
        pending = ""
    if pending.strip():
        lines.append(pending.strip())
    return lines


def dockerignore_patterns(path: Path = DOCKERIGNORE) -> list[str]:
    return [
        line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]


def is_ignored(relative_path: str, patterns: list[str]) -> bool:
    """Whether the build context leaves ``relative_path`` out (Docker's rules, less ``!`` exceptions).

    A pattern matches the path or any of its parent directories; ``**`` spans directories.
    """
    parts = relative_path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        regex = _glob_to_regex(pattern.strip("/"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            return True
    return False


def _glob_to_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)

"""The Docker images, checked without Docker: each Dockerfile parses, and each installs what its role allows."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
IMAGES = ("cpu", "gpu", "jetson")
INSTRUCTIONS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL", "MAINTAINER",
    "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
}
# pip install options that take the next word as their value
PIP_VALUE_OPTIONS = {
    "-r", "--requirement", "-c", "--constraint", "-i", "--index-url", "--extra-index-url", "-f", "--find-links",
    "-t", "--target", "--prefix", "--root", "--platform", "--python-version", "--implementation", "--abi",
}
HEAVY = ("torch", "transformers")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


class DockerfileError(ValueError):
    pass


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with their continuation lines joined, as Docker's parser reads them (default escape `\\`)."""
    instructions, pending, start = [], "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and pending):
            continue  # comments (and blank lines) inside a continuation are dropped, as Docker does
        if not stripped:
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        pending = ""
        if keyword.upper() not in INSTRUCTIONS:
            raise DockerfileError(f"line {start}: unknown instruction {keyword!r}")
        if not args.strip():
            raise DockerfileError(f"line {start}: {keyword} has no arguments")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
    if pending:
        raise DockerfileError(f"line {start}: the last instruction ends with a line continuation")
    return instructions


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    defaults = {}
    for i in instructions:
        if i.keyword == "ARG" and "=" in i.args:
            name, _, value = i.args.partition("=")
            defaults[name] = value
    return defaults


def substitute(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m[1] or m[2], m[0]), text)


def pip_installs(instructions: list[Instruction]) -> list[str]:
    """Every requirement named by a `pip install` in the RUN instructions, ARG defaults substituted."""
    variables = arg_defaults(instructions)
    found = []
    for i in instructions:
        if i.keyword != "RUN":
            continue
        lexer = shlex.shlex(substitute(i.args, variables), posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        words = list(lexer)
        for at, word in enumerate(words):  # `pip install`, `pip3 install` and `python -m pip install` alike
            if word in ("pip", "pip3") and words[at + 1:at + 2] == ["install"]:
                found += _requirements(words[at + 2:])
    return found


def _requirements(words: list[str]) -> list[str]:
    requirements, skip = [], False
    for word in words:
        if word in ("&&", "||", ";", "|"):
            break
        if skip:
            skip = False
        elif word in PIP_VALUE_OPTIONS:
            skip = True
        elif not word.startswith("-"):
            requirements.append(word)
    return requirements


def local_extras(requirement: str) -> set[str] | None:
    """{'runtime'} for '.[runtime]'; None when the requirement is not this project."""
    match = re.fullmatch(r"\.(?:\[([\w,\s-]*)\])?", requirement)
    return None if match is None else {e.strip() for e in (match[1] or "").split(",") if e.strip()}


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def extra_requirements(extra: str) -> set[str]:
    """Names of every package the extra installs, its references to this project's other extras followed."""
    project = pyproject()["project"]
    names = set()
    for spec in project["optional-dependencies"][extra]:
        requirement = Requirement(spec)
        if requirement.name == project["name"]:
            for inner in requirement.extras:
                names |= extra_requirements(inner)
        else:
            names.add(requirement.name)
    return names


def dockerfile(image: str) -> list[Instruction]:
    return parse_dockerfile((DOCKER / f"{image}.Dockerfile").read_text())


# ---- the parser itself ----------------------------------------------------------------------------------------------


def test_parser_joins_continuations_and_skips_comments():
    text = "# syntax=docker/dockerfile:1\nFROM python:3.12-slim\nRUN a \\\n    # a comment\n    && b\nCMD [\"x\"]\n"
    assert parse_dockerfile(text) == [
        Instruction("FROM", "python:3.12-slim", 2),
        Instruction("RUN", "a && b", 3),
        Instruction("CMD", '["x"]', 6),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("FROM x\nRUN a \\\n", "line 2: the last instruction ends with a line continuation"),
        ("FROM x\nINSTALL y\n", "line 2: unknown instruction 'INSTALL'"),
        ("FROM x\nWORKDIR\n", "line 2: WORKDIR has no arguments"),
    ],
)
def test_parser_refuses_broken_dockerfiles(text, message):
    with pytest.raises(DockerfileError, match=re.escape(message)):
        parse_dockerfile(text)


def test_pip_installs_are_read_across_chained_commands():
    [run] = parse_dockerfile(
        'RUN pip install --index-url https://x/cpu torch && pip uninstall -y a && python3 -m pip install ".[a,b]" c>=1'
    )
    assert pip_installs([run]) == ["torch", ".[a,b]", "c>=1"]


# ---- the three images -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("image", IMAGES)
def test_dockerfile_is_well_formed(image):
    instructions = dockerfile(image)
    first = next(i for i in instructions if i.keyword != "ARG")  # ARG may come first, to name the base image
    assert first.keyword == "FROM"
    entrypoint = next(i for i in instructions if i.keyword == "ENTRYPOINT")
    assert json.loads(entrypoint.args) == ["vl-export"]
    for copy in (i for i in instructions if i.keyword == "COPY"):
        *sources, _ = copy.args.split()
        for source in sources:
            assert (ROOT / source).exists(), f"{image}.Dockerfile line {copy.line}: COPY {source} is not in the repo"


@pytest.mark.parametrize(
    ("image", "base"),
    [
        ("cpu", r"python:3\.\d+-slim"),
        ("gpu", r"nvcr\.io/nvidia/tensorrt:\d\d\.\d\d-py3"),
        ("jetson", r"nvcr\.io/nvidia/l4t-(jetpack|tensorrt):r\d+\.\d+(\.\d+)?"),
    ],
)
def test_base_images(image, base):
    instructions = dockerfile(image)
    source = next(i for i in instructions if i.keyword == "FROM").args
    assert re.fullmatch(base, substitute(source, arg_defaults(instructions)))


def test_cpu_image_installs_exactly_the_runtime_extra_and_no_torch():
    assert pip_installs(dockerfile("cpu")) == [".[runtime]"]
    project = pyproject()["project"]
    installed = extra_requirements("runtime") | {Requirement(d).name for d in project["dependencies"]}
    assert installed == {"numpy", "pillow", "tokenizers", "onnxruntime"}
    for instruction in dockerfile("cpu"):  # comments may say "no torch"; no instruction may name it
        assert not re.search(r"\b(torch|transformers)\b", instruction.args, re.IGNORECASE), instruction


def test_gpu_image_installs_export_trt_and_onnxruntime_gpu():
    installs = pip_installs(dockerfile("gpu"))
    assert [local_extras(r) for r in installs if local_extras(r) is not None] == [{"export", "trt"}]
    assert "onnxruntime-gpu" in installs
    assert {"tensorrt", "cuda-python", "torch", "onnx"} <= extra_requirements("export") | extra_requirements("trt")


def test_jetson_image_installs_the_runtime_and_the_trt_extra_but_tensorrt_itself():
    installs = pip_installs(dockerfile("jetson"))
    assert [local_extras(r) for r in installs if local_extras(r) is not None] == [{"runtime"}]
    others = {Requirement(r).name for r in installs if local_extras(r) is None}
    assert others == extra_requirements("trt") - {"tensorrt"}  # JetPack's own TensorRT 10 stands in for it
    assert not others & set(HEAVY) and not extra_requirements("runtime") & set(HEAVY)

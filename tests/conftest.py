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


def hvd_infer_np(np_, args, env=None, timeout=600, cwd=REPO):
    """Our launcher: python -m hvd_infer -np N ARGS (checks the job, then runs horovodrun)."""
    return python_m(["-np", str(np_)] + list(args), env=env, timeout=timeout, cwd=cwd)


def torchrun(nproc, args, env=None, timeout=600, cwd=REPO):
    """Start real ranks on torch.distributed: torchrun --nproc-per-node N -m hvd_infer ARGS."""
    exe = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [exe, "--nproc-per-node", str(nproc), "-m", "hvd_infer"] + list(args)
    e = dict(os.environ, **(env or {}))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=e)


def job_args(model, data, out, tmp, *extra):
    """The command-line job the backends are compared on: ids, small batches and parts, MLflow in tmp."""
    return ["--config", "/dev/null", f"model.path={model}", f"data.path={data}", "data.id_columns=[id,doc]",
            f"output.path={out}", f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db", "data.batch_size=8",
            "output.rows_per_part=40", "runtime.progress=false", *extra]


def read_output(out):
    """An output directory as a DataFrame sorted by id."""
    import pyarrow.dataset as pads

    return pads.dataset(str(out)).to_table().to_pandas().sort_values("id").reset_index(drop=True)


def assert_same_predictions(got, ref, atol=1e-6):
    """Row by row: every id exactly once, the same ids, labels and probabilities."""
    import numpy as np

    assert got["id"].tolist() == ref["id"].tolist()
    assert got["doc"].tolist() == ref["doc"].tolist()
    assert got["label"].tolist() == ref["label"].tolist()
    np.testing.assert_allclose(got["score"].to_numpy(), ref["score"].to_numpy(), atol=atol)
    np.testing.assert_allclose(np.stack(got["probs"]), np.stack(ref["probs"]), atol=atol)


@pytest.fixture(scope="session")
def horovodrun_reference(tmp_path_factory, tiny_classifier, dataset):
    """horovodrun -np 2 on the tiny classifier and the 157-row dataset: what other launchers must equal."""
    tmp = tmp_path_factory.mktemp("horovodrun_reference")
    r = horovodrun(2, job_args(tiny_classifier, dataset[0], tmp / "out", tmp))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return read_output(tmp / "out")


def python_m(args, env=None, timeout=600, cwd=REPO):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "hvd_infer"] + list(args), capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=e)

"""The released form: `python -m build` makes a wheel and an sdist, and the wheel, installed apart from the
checkout, runs a job. It reuses this venv's dependencies (`pip install --no-deps --target`): seconds, not a
second torch install."""
import glob
import os
import subprocess
import sys
import tarfile
import zipfile

import pytest

import hvd_infer
from conftest import REPO, read_output

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: the venv's setuptools and wheel build it, nothing is downloaded.
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", str(out), REPO],
                   check=True, capture_output=True, text=True)
    return out


def test_the_wheel_and_sdist_hold_the_package_and_its_papers(dist):
    (wheel,) = glob.glob(f"{dist}/hvd_infer-{hvd_infer.__version__}-py3-none-any.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "hvd_infer/tasks/embedding.py" in names and "hvd_infer/config_reference.py" in names
    assert not [n for n in names if n.startswith(("tests/", "scripts/"))]
    meta = zipfile.ZipFile(wheel).read(f"hvd_infer-{hvd_infer.__version__}.dist-info/METADATA").decode()
    assert "License-Expression: Apache-2.0" in meta or "License: Apache-2.0" in meta
    assert "Provides-Extra: delta" in meta and "hvd-infer = hvd_infer.__main__:main" in \
        zipfile.ZipFile(wheel).read(f"hvd_infer-{hvd_infer.__version__}.dist-info/entry_points.txt").decode()
    (sdist,) = glob.glob(f"{dist}/hvd_infer-{hvd_infer.__version__}.tar.gz")
    members = tarfile.open(sdist).getnames()
    assert f"hvd_infer-{hvd_infer.__version__}/LICENSE" in members


def test_the_installed_wheel_runs_a_job(dist, tmp_path, tiny_classifier, dataset):
    target = tmp_path / "site"
    (wheel,) = glob.glob(f"{dist}/*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                    "--target", str(target), wheel], check=True)
    # Run from elsewhere, the wheel's package first on the path: the checkout is not what runs.
    env = dict(os.environ, PYTHONPATH=str(target))
    exe = str(target / "bin" / "hvd-infer")
    where = subprocess.run([sys.executable, "-c", "import hvd_infer; print(hvd_infer.__file__)"], env=env,
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(target)), where
    helped = subprocess.run([exe, "--help"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert helped.returncode == 0 and "--config-keys" in helped.stdout, helped.stderr
    out = tmp_path / "out"
    r = subprocess.run([exe, "--config", "/dev/null", f"model.path={tiny_classifier}", f"data.path={dataset[0]}",
                        "data.id_columns=[id,doc]", f"output.path={out}", "mlflow.enabled=false", "runtime.progress=false"],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "_SUCCESS").exists()
    got = read_output(out)
    assert sorted(got["id"]) == sorted(dataset[1].column("id").to_pylist())

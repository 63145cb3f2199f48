"""Accuracy, macro-F1 and the confusion matrix against gold labels (data.label_column).

Each rank counts (gold, predicted) pairs; rank 0 sums every rank's counts, so the
figures are over the whole dataset, not per rank.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa


class Evaluation:
    def __init__(self, task):
        if "label" not in [f.name for f in task.output_fields()]:
            raise ValueError(f"data.label_column is set but model.task={task.name} predicts no label")
        self.counts: Counter = Counter()

    def add(self, gold: np.ndarray, table: pa.Table) -> None:
        pred = table.column("label").to_pylist()
        self.counts.update(zip((str(g) for g in gold), pred))

    @staticmethod
    def matrix(all_counts: List[Optional[Counter]]) -> Tuple[List[str], np.ndarray]:
        total: Counter = Counter()
        for c in all_counts:
            total.update(c or {})
        labels = sorted({g for g, _ in total} | {p for _, p in total})
        index = {l: i for i, l in enumerate(labels)}
        cm = np.zeros((len(labels), len(labels)), dtype=np.int64)
        for (g, p), n in total.items():
            cm[index[g], index[p]] += n
        return labels, cm

    @staticmethod
    def scores(labels: List[str], cm: np.ndarray) -> Dict[str, float]:
        n = cm.sum()
        tp = np.diag(cm).astype(float)
        precision = np.divide(tp, cm.sum(axis=0), out=np.zeros_like(tp), where=cm.sum(axis=0) > 0)
        recall = np.divide(tp, cm.sum(axis=1), out=np.zeros_like(tp), where=cm.sum(axis=1) > 0)
        f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
        # As scikit-learn: macro-F1 averages over labels seen in gold or predictions.
        return {"accuracy": float(tp.sum() / n) if n else 0.0, "macro_f1": float(f1.mean()) if len(f1) else 0.0,
                "eval_rows": int(n)}

    @classmethod
    def report(cls, all_counts) -> Tuple[Dict[str, float], str, Dict[str, Any]]:
        labels, cm = cls.matrix(all_counts)
        s = cls.scores(labels, cm)
        width = max([len(l) for l in labels] + [6])
        lines = [f"\nevaluation over {s['eval_rows']} rows: accuracy {s['accuracy']:.4f}, macro-F1 {s['macro_f1']:.4f}",
                 "confusion matrix (rows: gold, columns: predicted)",
                 " " * width + " " + " ".join(f"{l[:width]:>{width}}" for l in labels)]
        for i, l in enumerate(labels):
            lines.append(f"{l[:width]:>{width}} " + " ".join(f"{v:>{width}}" for v in cm[i]))
        return s, "\n".join(lines), {"confusion_matrix.png": _figure(labels, cm)}


def _figure(labels: List[str], cm: np.ndarray):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(labels), 1.0 + 0.6 * len(labels)))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="predicted", ylabel="gold")
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black", fontsize=8)
    fig.tight_layout()
    return fig

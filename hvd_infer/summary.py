"""Figures each rank keeps, and the job summary rank 0 prints and logs."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

# Variables of the user's environment that change what a job does when set. The summary and the
# MLflow params (env.NAME) show their values; MLFLOW_* variables by name only (they may hold credentials).
ENVIRONMENT = (
    "TOKENIZERS_PARALLELISM",  # the tokenizer's thread pool in the rank (never in data loader workers: loader.py)
    "OMP_NUM_THREADS", "MKL_NUM_THREADS",  # threads of the libraries torch and the workers call
    "OMP_WAIT_POLICY",  # idle OpenMP threads spin (ACTIVE) or sleep (PASSIVE, set unless given: context.py)
    "CUDA_VISIBLE_DEVICES",  # which GPUs the ranks see, and whether they see one
    "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",  # set to 1 unless given: nothing is fetched from a hub
    "PYTHONHASHSEED",
    "HVD_INFER_CPU_BF16", "HVD_INFER_CPU_VNNI", "HVD_INFER_CPU_AVX512",  # override the CPU probe (hardware.py)
)


def user_environment(environ: Mapping[str, str] = os.environ) -> Dict[str, str]:
    """The variables of ENVIRONMENT that are set, with their values, and each MLFLOW_* one as "set"; read before
    the runner sets its own defaults."""
    found = {name: environ[name] for name in ENVIRONMENT if name in environ}
    found.update({name: "set" for name in sorted(environ) if name.startswith("MLFLOW_")})
    return found


@dataclass
class RankFigures:
    rank: int = 0
    host: str = ""
    device: str = ""
    threads: int = 0
    workers: int = 0  # data loader processes (0: a thread)
    max_tokens_per_batch: int = 0  # the token budget used (0: batches by rows)
    rows: int = 0
    parts: int = 0
    batches: int = 0
    seconds: float = 0.0  # the scoring loop: read, tokenize, forward, write
    total_seconds: float = 0.0  # this rank's whole run, start-up and model load included
    load_seconds: float = 0.0
    rescored: int = 0  # model.rescore_margin: sequences scored again in float32
    read_seconds: float = 0.0
    tokenize_seconds: float = 0.0
    forward_seconds: float = 0.0
    write_seconds: float = 0.0
    wait_seconds: float = 0.0  # the model thread waiting on data
    # read_seconds and tokenize_seconds are summed over this rank's loader workers, which run side by side
    real_tokens: int = 0
    padded_tokens: int = 0
    largest_batch_tokens: int = 0  # padded tokens of this rank's largest batch: what bounds its activations
    truncated: int = 0
    chunked: int = 0  # model.long_texts=chunk: rows longer than one window
    chunk_windows: int = 0  # the windows those rows were split into
    skipped: int = 0
    repeats: int = 0  # rows that got the prediction of an earlier row of their part with the same text (data.dedup)

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["rows_per_second"] = self.rows_per_second
        return d


def report(cfg, ctx, figures: List[RankFigures], facts: Dict[str, Any], environment: Optional[Dict[str, str]] = None
           ) -> Tuple[Dict[str, float], str, Dict[str, Any]]:
    """(MLflow metrics, printed summary, manifest summary) for the whole job; environment: user_environment()."""
    rows = sum(f.rows for f in figures)
    seconds = max(f.seconds for f in figures)  # ranks run side by side
    wall = max(f.total_seconds for f in figures)
    forward = sum(f.forward_seconds for f in figures)
    real, padded = sum(f.real_tokens for f in figures), sum(f.padded_tokens for f in figures)
    m: Dict[str, float] = {
        "rows": rows, "seconds": seconds, "rows_per_second": rows / seconds if seconds else 0.0,
        "wall_seconds": wall, "end_to_end_rows_per_second": rows / wall if wall else 0.0,
        "load_seconds": max(f.load_seconds for f in figures),
        "padding_efficiency": real / padded if padded else 1.0,
        "largest_batch_tokens": max(f.largest_batch_tokens for f in figures),
        "truncated_texts": sum(f.truncated for f in figures),
        "chunked_texts": sum(f.chunked for f in figures),
        "chunk_windows": sum(f.chunk_windows for f in figures),
        "skipped_texts": sum(f.skipped for f in figures),
        "dedup_saved_rows": sum(f.repeats for f in figures),  # forward rows data.dedup saved
        "world_size": ctx.size,
    }
    for stage in ("read", "tokenize", "forward", "write", "wait"):
        m[f"{stage}_seconds"] = sum(getattr(f, f"{stage}_seconds") for f in figures)
    m["data_wait_fraction"] = m["wait_seconds"] / forward if forward else 0.0
    for f in figures:
        m[f"rank_{f.rank}_rows"] = f.rows
        m[f"rank_{f.rank}_rows_per_second"] = f.rows_per_second
    lines = [f"\nhvd_infer: {cfg.model.task} with {facts['model_path']} ({facts['dtype']}"
             f"{', ' + facts['quantize'] if facts['quantize'] != 'none' else ''}"
             f"{', rows with a margin under %g rescored in float32' % facts['rescore_margin'] if facts.get('rescore_margin') else ''}"
             f"{', DeepSpeed' if facts['deepspeed'] else ''}"
             f"{', ONNX Runtime (' + facts['onnx_optimizer'] + ')' if facts.get('runtime') == 'onnxruntime' else ''}"
             f"{' + kernel injection' if facts['kernel_inject'] else ''})",
             *facts.get("notes", []),
             f"{'rank':>5} {'host':<14} {'device':<8} {'threads':>7} {'rows':>9} {'seconds':>8} {'rows/s':>9}"]
    for f in figures:
        lines.append(f"{f.rank:>5} {f.host[:14]:<14} {f.device:<8} {f.threads:>7} {f.rows:>9} {f.seconds:>8.2f} "
                     f"{f.rows_per_second:>9.1f}")
    lines.append(f"{'all':>5} {'':<14} {'':<8} {'':>7} {rows:>9} {seconds:>8.2f} {m['rows_per_second']:>9.1f}"
                 f"   (end to end {wall:.1f} s, {m['end_to_end_rows_per_second']:.1f} rows/s; model load {m['load_seconds']:.1f} s)")
    lines.append(f"stages, summed over ranks: read {m['read_seconds']:.2f} s, tokenize {m['tokenize_seconds']:.2f} s, "
                 f"forward {forward:.2f} s, write {m['write_seconds']:.2f} s; model waited on data "
                 f"{100 * m['data_wait_fraction']:.1f}% of forward time")
    lines.append(f"padding efficiency {m['padding_efficiency']:.3f} (real tokens / padded tokens); "
                 + (f"data.workers {figures[0].workers} per rank" if figures[0].workers
                    else "data.workers 0 (reading and tokenizing in a thread of each rank)")
                 + (f", token budget {figures[0].max_tokens_per_batch} per batch" if figures[0].max_tokens_per_batch else ""))
    lines.append(f"reader: {facts['reader']}")
    if facts.get("last_layer") == "first position":
        lines.append("last layer: the first position only, all the head reads (model.trim_last_layer)")
    elif facts.get("last_layer", "").startswith("whole: ") and cfg.model.trim_last_layer:  # and why
        lines.append(f"last layer: {facts['last_layer']}")
    kernels = facts.get("linear_kernels", "")
    if kernels.startswith("oneDNN"):
        lines.append(f"linear layers: {kernels} (model.onednn)")
    elif kernels.startswith("torch: ") and cfg.model.onednn and "oneDNN" in kernels:  # it was tried: say why not
        lines.append(f"linear layers: {kernels}")
    if m["truncated_texts"]:
        lines.append(f"truncated {int(m['truncated_texts'])} texts longer than model.max_length={cfg.model.max_length} tokens")
    dedup = facts.get("dedup", "off")
    if dedup == "on":
        saved = int(m["dedup_saved_rows"])
        lines.append(f"data.dedup: {saved} rows repeated a text scored earlier in their part and got its prediction: "
                     f"{saved} forward rows saved ({100 * saved / rows if rows else 0:.1f}% of rows)")
    elif cfg.data.dedup:
        lines.append(f"data.dedup {dedup}; 0 forward rows saved")
    if m["chunked_texts"]:
        lines.append(f"chunked {int(m['chunked_texts'])} texts longer than model.max_length={cfg.model.max_length} "
                     f"tokens into {int(m['chunk_windows'])} windows (model.stride={cfg.model.stride})")
    if facts.get("rescore_margin"):
        m["rescored_rows"] = sum(f.rescored for f in figures)
        lines.append(f"model.rescore_margin={facts['rescore_margin']:g}: {int(m['rescored_rows'])} forward rows int8 was "
                     f"unsure of rescored in float32 ({100 * m['rescored_rows'] / max(1, rows):.1f}% of rows)")
    if m["skipped_texts"]:
        lines.append(f"skipped {int(m['skipped_texts'])} null/empty texts (data.on_null=skip; ids in the manifest)")
    if cfg.mlflow.enabled:
        lines.append(f"predictions in MLflow: {mlflow_predictions(cfg, rows)}")
    if environment:
        lines.append("set in the environment: " + ", ".join(name if name.startswith("MLFLOW_") else f"{name}={value}"
                                                            for name, value in environment.items()))
    summary = {k: v for k, v in m.items() if not k.startswith("rank_")}
    summary.update(environment=environment or {}, reader=facts["reader"], runtime=facts.get("runtime", "eager"),
                   ranks=[f.as_dict() for f in figures])
    if cfg.mlflow.enabled:
        summary["mlflow_predictions"] = mlflow_predictions(cfg, rows)
    return m, "\n".join(lines), summary


def mlflow_predictions(cfg, rows: int) -> str:
    """What of the predictions the MLflow run holds (mlflow.log_predictions); rows: those this run wrote."""
    from hvd_infer.config import mask_secrets
    from hvd_infer.tracking import SAMPLE_ARTIFACT, SAMPLE_ROWS

    out = mask_secrets(cfg.output.path)
    setting = cfg.mlflow.log_predictions
    if setting == "sample":
        # A resumed output also holds earlier runs' rows, which this run did not count.
        size = f"{min(rows, SAMPLE_ROWS):,}" if rows >= SAMPLE_ROWS or cfg.output.mode != "resume" \
            else f"up to {SAMPLE_ROWS:,}"
        return f"sample of {size} rows, the output's first in input order ({SAMPLE_ARTIFACT}); every row: {out}"
    if setting == "all" and "://" not in cfg.output.path:
        return f"every part (predictions/rank-NNNNN/), a second copy of {out}"
    if setting == "all":
        return f"none: mlflow.log_predictions=all copies the parts of a local output only; every row: {out}"
    return f"none (mlflow.log_predictions=none); every row: {out}"

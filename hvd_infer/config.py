"""The job's configuration: typed dataclasses, built from YAML plus dotted overrides.

Everything here is light (no torch, no horovod): a wrong key or value fails in
one line that names it, before anything heavy is imported or loaded.

    cfg = load_config("conf/job.yaml", ["data.batch_size=64", "model.dtype=bfloat16"])
"""
from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Union

import yaml

from hvd_infer.errors import ConfigError

# The embedded demo job; the package is installed editable from the repo (scripts/install.sh).
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf", "default.yaml")


def bounded(default: Any, lo: Any = None, hi: Any = None, lo_open: bool = False, note: str = "") -> Any:
    """A numeric field whose range is declared with it and checked when the config is built."""
    return field(default=default, metadata={"range": (lo, hi, lo_open, note)})


def _check_range(key: str, value: Any, spec) -> None:
    lo, hi, lo_open, note = spec
    if value is None or isinstance(value, str):  # None or a keyword such as "auto"
        return
    low_bad = lo is not None and (value <= lo if lo_open else value < lo)
    if low_bad or (hi is not None and value > hi):
        if hi is None:
            want = f"{'>' if lo_open else '>='} {lo}"
        else:
            want = f"in {'(' if lo_open else '['}{lo}, {hi}]"
        raise ConfigError(f"{key} must be {want}{note}, got {value}")


@dataclass
class ModelConfig:
    path: str = ""  # a model directory (save_pretrained), or an MLflow URI: models:/name/1, runs:/id/model
    # text-classification, embedding, zero-shot-classification, token-classification or text-generation
    task: str = "text-classification"
    # auto: float16 on CUDA, float32 on CPU; auto-check: rank 0 times float32 and each faster precision the
    # device runs natively on model.check_rows of the job's rows and every rank uses the fastest that agrees
    dtype: Literal["auto", "auto-check", "float32", "float16", "bfloat16"] = "auto"
    # int8-per-channel: dynamic int8 Linear layers with per-channel weight scales, the task head left in
    # float32. CPU only. int8-blockwise (model.runtime=onnxruntime): int8 weights in blocks of 128 inputs, and
    # activations quantized per row and block as they come (ONNX Runtime's MatMulNBits), the head in float32:
    # slower than int8-per-channel, with a tenth of its error (embeddings, entities, many-class labels)
    quantize: Literal["none", "int8-per-channel", "int8-blockwise"] = "none"
    # text-classification with model.quantize: rows whose two likeliest labels are closer in probability than this
    # are scored again in float32 and take float32's outputs (int8 speed where the model is sure); 0: off
    rescore_margin: float = bounded(0.0, 0, 1)
    allow_slow_bf16: bool = False  # run model.dtype=bfloat16 on a CPU without AVX512-BF16/AMX (many times slower)
    check_rows: int = bounded(512, 8, 100000)  # model.dtype=auto-check: rows of the job's input it scores per precision, at most
    check_agreement: float = bounded(0.995, 0, 1, lo_open=True)  # auto-check: least agreement with float32 to accept
    # The engine of the forward pass: eager (torch, DeepSpeed-wrapped where model.deepspeed) or onnxruntime
    # (CPU float32: the model exported to ONNX once per host and run by ONNX Runtime, quantized by ONNX Runtime
    # where model.quantize says; not for text-generation)
    runtime: Literal["eager", "onnxruntime"] = "eager"
    deepspeed: bool = True  # wrap with deepspeed.init_inference (model.runtime=eager)
    # text-classification and zero-shot with a head that reads only the first position ([CLS]-pooled BERT,
    # RoBERTa, ...), and embedding with cls pooling: the last layer computes that position alone (the same
    # outputs, checked on a probe batch at load; ~1/7 less work on a 6-layer model); false: the whole layer
    trim_last_layer: bool = True
    # CPU float32 (model.runtime=eager, no model.quantize): Linear layers on oneDNN's kernels, GELU and residual
    # adds fused into them, as torch.compile's inductor does, without compiling (the same outputs, checked on a
    # probe batch at load; ~1.2x a MiniLM's forward); false: torch's own Linear
    onednn: bool = True
    kernel_inject: Optional[bool] = None  # DeepSpeed kernel injection; None = on for CUDA, off for CPU
    max_length: int = bounded(256, 1)  # tokens per sequence; longer texts are truncated and counted, or chunked
    # Texts longer than max_length: truncate (cut, counted) or chunk (scored whole: windows of max_length tokens
    # overlapping by model.stride, each scored, the row's result assembled from its windows). Not for text-generation
    long_texts: Literal["truncate", "chunk"] = "truncate"
    stride: int = bounded(32, 0)  # long_texts=chunk: tokens each window shares with the one before (< max_length)
    # long_texts=chunk, text-classification and zero-shot: a row's logits are the mean or max over its windows
    chunk_aggregation: Literal["mean", "max"] = "mean"
    trust_remote_code: bool = False  # run Python shipped with the model; off unless you trust it
    allow_pickle: bool = False  # load pytorch_model.bin (weights_only) when no safetensors exist


@dataclass
class DataConfig:
    path: str = ""  # a Parquet file, directory or glob; local or any fsspec URL
    text_column: str = "text"  # the column holding the text each row is scored on
    text_pair_column: Optional[str] = None  # second text, for models trained on pairs
    id_columns: List[str] = field(default_factory=list)  # copied through to the output, first
    label_column: Optional[str] = None  # gold labels: accuracy, macro-F1, confusion matrix
    batch_size: int = bounded(32, 1)  # rows per forward pass
    # > 0: batches sized by padded tokens instead of rows; 0: off; auto (default): on CUDA, sized from the
    # GPU's free memory and the model (not for text-generation), off on CPU
    max_tokens_per_batch: Union[int, Literal["auto"]] = bounded("auto", 0, note=" (0 = off)")
    sort_window: int = bounded(4096, 1)  # rows sorted by length together, to keep padding small
    # Batch width rounded up to a multiple of this (1 = no rounding). auto (default): 8 on CUDA, where
    # tensor cores want aligned widths and few distinct shapes keep the allocator flat; 1 on CPU, where
    # rounding only adds padding (0.922 -> 0.970 padding efficiency on the bench's corpus)
    pad_to_multiple_of: Union[int, Literal["auto"]] = bounded("auto", 1, note=" (1 = no rounding)")
    on_null: Literal["error", "skip", "empty"] = "error"  # null or empty text: fail, drop (ids in the manifest), or score ""
    # Score each distinct (text, pair) of a part once and copy its prediction to the part's other rows that
    # repeat it (outputs unchanged; the summary counts the forward rows saved). Off by itself where equal inputs
    # may get different outputs (text-generation with generation.do_sample=true)
    dedup: bool = True
    storage_options: Dict[str, Any] = field(default_factory=dict)  # passed to fsspec for data.path (endpoint_url, key, ...); {} = the store's defaults, e.g. AWS_* variables
    # Processes per rank that read and tokenize, sharing the parts in units of whole sort windows; 0: one
    # thread in the rank's process. auto (default): on CUDA the rank's share of the host's cores minus one, on CPU 0
    workers: Union[int, Literal["auto"]] = bounded("auto", 0, note=" (0 = a thread in the rank's process)")
    # Who reads the row groups: petastorm, or pyarrow itself (same rows, same batches). auto (default): petastorm
    # where it imports and can read (pyarrow < 15), else pyarrow; the summary and MLflow say which ran and why
    reader: Literal["auto", "petastorm", "pyarrow"] = "auto"


@dataclass
class OutputConfig:
    path: str = ""  # directory or object-store prefix (s3://, gs://, abfss://) of Parquet parts (+ _manifest.json, _SUCCESS)
    # parquet: the parts are the output; delta: the same parts, which rank 0 commits at the end to a Delta table at
    # output.path in one transaction, so readers see the whole job or none of it (needs pip install deltalake)
    format: Literal["parquet", "delta"] = "parquet"
    # error: refuse a non-empty dir; overwrite: replace what is there (delta: a new table version of only this job's
    # rows); resume: finish an interrupted run, keeping its finished parts; append (delta only): add this job's rows
    mode: Literal["error", "overwrite", "resume", "append"] = "error"
    rows_per_part: int = bounded(50000, 1)  # each part is written whole or not at all and is the unit of resume
    compression: Literal["snappy", "zstd", "gzip", "lz4", "none"] = "snappy"  # the Parquet parts' codec
    # passed to fsspec for output.path, and with output.format=delta to deltalake too (on s3:// key, secret,
    # endpoint_url and client_kwargs become its AWS_* names); {} = the store's defaults
    storage_options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class MlflowConfig:
    enabled: bool = True  # track the job as an MLflow run (params, live metrics, summary, manifest)
    tracking_uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<launch dir>/mlflow.db
    experiment: str = "hvd_infer"  # the experiment the run is logged to (created if missing)
    run_name: Optional[str] = None  # None: MLflow picks a name
    artifact_location: Optional[str] = None  # for a new experiment; None = mlartifacts/ beside a sqlite store
    # What of the predictions the run holds besides the manifest: sample (the first 1,000 rows in input order, as
    # one Parquet file), all (every part of a local output: a second copy) or none; true/false are refused: they meant all/none
    log_predictions: Literal["sample", "all", "none"] = "sample"
    tags: Dict[str, str] = field(default_factory=dict)  # set on the run, e.g. {team: search}
    log_every_s: float = bounded(30.0, 0, lo_open=True)  # live step metrics from every rank this often (seconds; slows down past a few hundred points)
    system_metrics: bool = True  # CPU, memory, disk, network (and GPU with nvidia-ml-py) from every rank, as MLflow system metrics


@dataclass
class RuntimeConfig:
    threads: int = bounded(0, 0, note=" (0 = auto)")  # torch threads per rank; 0 = CPU cores // ranks on this host
    progress: bool = True  # tqdm bar on rank 0
    # A collective that hears nothing from another rank this long fails (Horovod's Gloo, torch.distributed's
    # rendezvous), and `hvd-infer -H` ends a job whose host has not answered this long (down, or cut off)
    collective_timeout_s: int = bounded(300, 10)
    # A rank with no batch scored and no part written for this long fails the job in one line naming the stuck
    # stage, with its threads' stacks in a file beside the output. auto (default): 600 s, or 10x the longest wait
    # between two batches so far when that is longer. A rank waiting for the others at the end allows twice that
    # plus the time its own share took
    stall_timeout_s: Union[float, Literal["auto"]] = bounded("auto", 0, lo_open=True, note=" seconds, or auto")


@dataclass
class ZeroShotConfig:
    candidate_labels: List[str] = field(default_factory=list)  # model.task=zero-shot-classification: the labels to choose from
    hypothesis_template: str = "This example is {}."  # the NLI hypothesis for each label ({} is replaced by the label)
    # false: the labels compete (one softmax over them, the scores sum to 1); true: each label is judged on its own
    # (entailment against contradiction), as with a single candidate label
    multi_label: bool = False


@dataclass
class GenerationConfig:
    max_new_tokens: int = bounded(32, 1)  # model.task=text-generation: tokens generated per row, at most
    do_sample: bool = False  # false: greedy decoding (equal to model.generate on each prompt alone); true: sampling
    temperature: float = bounded(1.0, 0, lo_open=True)  # do_sample: the logits are divided by this before sampling
    top_p: float = bounded(1.0, 0, 1, lo_open=True)  # do_sample: sample from the likeliest tokens that make up this probability
    # do_sample: each batch draws from a stream seeded by this and the batch's tokens (the same config and batches
    # give the same texts on every rerun)
    seed: int = 0


@dataclass
class TokenClassificationConfig:
    # model.task=token-classification: how tokens are grouped into entities, as transformers' pipeline
    # aggregation_strategy (none: one entry per token)
    aggregation: Literal["none", "simple", "first", "average", "max"] = "simple"


@dataclass
class EmbeddingConfig:
    # Text put before every row, e.g. "query: " (E5/BGE-style models); null: the model's default prompt, if any
    prompt: Optional[str] = None
    # A prompt the model defines by name in config_sentence_transformers.json (e.g. query, passage); null: none
    prompt_name: Optional[str] = None
    dimensions: int = bounded(0, 0, note=" (0 = all of the model's)")  # keep the first k dims (Matryoshka models)


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    zero_shot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    token_classification: TokenClassificationConfig = field(default_factory=TokenClassificationConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_SECRET = re.compile(r"token|password|passwd|secret|key|credential|auth", re.I)
_URL_USERINFO = re.compile(r"(\w+://)([^/@\s]+)@")


def mask_secrets(obj: Any, key: str = "") -> Any:
    """Copy of obj with secret-looking keys' values and URL credentials masked, for logs and MLflow."""
    if isinstance(obj, dict):
        return {k: mask_secrets(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [mask_secrets(v, key) for v in obj]
    if key and _SECRET.search(key.rsplit(".", 1)[-1]) and key not in _NOT_SECRET and obj not in (None, ""):
        return "***"
    if isinstance(obj, str):
        return _URL_USERINFO.sub(r"\1***@", obj)
    return obj


# Config keys whose names look secret but are not.
_NOT_SECRET = {"max_tokens_per_batch", "max_new_tokens"}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        return str(choices[0]) if len(choices) == 1 else "one of " + ", ".join(map(str, choices))
    if origin is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        names = " or ".join(_type_name(a) for a in args)
        return names + " or null" if type(None) in typing.get_args(tp) else names
    if origin in (list, List):
        return "list of " + _type_name(typing.get_args(tp)[0])
    if origin in (dict, Dict):
        return "mapping"
    return {str: "string", int: "integer", float: "number", bool: "true/false"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(REMOVED_VALUES.get(f"{key}={value}")
                              or f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        # A number or a keyword (Union[int, Literal["auto"]]): the keyword first.
        for a in args[1:]:
            if typing.get_origin(a) is Literal and value in typing.get_args(a):
                return value
        if len(args) == 1:
            return _coerce(value, args[0], key)
        try:
            return _coerce(value, args[0], key)
        except ConfigError:
            raise ConfigError(f"{key} must be a{'n' if args[0] is int else ''} {_type_name(tp)}, got {value!r}") from None
    if origin in (list, List):
        (inner,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a {_type_name(tp)}, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        if typing.get_args(tp)[1] is Any:  # passed through to a library (fsspec): nested values kept as they are
            return {str(k): v for k, v in value.items()}
        return {str(k): str(v) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


# Keys a job may still name that no longer exist: what to do instead.
REMOVED = {"runtime.seed": "inference draws no random numbers; remove it (generation.seed seeds sampled text-generation)",
           "model.keep_float32": "int8 with Linear layers left in float32 kept fewer labels than rescoring in every "
                                 "check measured; use model.rescore_margin (text-classification) or "
                                 "model.dtype=auto-check"}
# Values of a key that no longer exist, as key=value: the line that refuses them.
REMOVED_VALUES = {"model.quantize=int8": "model.quantize=int8 (per-tensor scales) was removed: use "
                                         "model.quantize=int8-per-channel, faster and closer to float32 on every "
                                         "CPU measured"}


def _build(cls: type, values: Dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'the config'} must be a mapping of keys, got {values!r}")
    kwargs = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if full in REMOVED:
            raise ConfigError(f"config key '{full}' was removed: {REMOVED[full]}")
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'; valid keys{' in ' + prefix if prefix else ''} are: {', '.join(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, full)
        else:
            kwargs[key] = _coerce(value, tp, full)
            if "range" in fields[key].metadata:
                _check_range(full, kwargs[key], fields[key].metadata["range"])
    return cls(**kwargs)


def _set_dotted(tree: Dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.get(p)
        if not isinstance(child, dict):
            child = {}
            node[p] = child
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value (e.g. data.batch_size=64)")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _choice(key: str, value: Any, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")


def validate(cfg: JobConfig) -> JobConfig:
    from hvd_infer.tasks import TASKS  # a registry of names only: no heavy imports

    m, d, o = cfg.model, cfg.data, cfg.output
    if not m.path:
        raise ConfigError("model.path is required: a model directory saved with save_pretrained, or an MLflow model URI")
    _choice("model.task", m.task, sorted(TASKS))
    if m.quantize != "none" and m.dtype == "auto-check":
        raise ConfigError(f"model.dtype=auto-check chooses the quantization itself; set model.quantize=none "
                          f"(got {m.quantize}) or pick model.dtype=float32 with model.quantize={m.quantize}")
    if m.quantize != "none" and m.dtype not in ("auto", "float32"):
        raise ConfigError(f"model.quantize={m.quantize} runs float32 activations; set model.dtype=float32 (got {m.dtype})")
    if m.rescore_margin and (m.quantize == "none" or m.task != "text-classification"):
        raise ConfigError(f"model.rescore_margin rescores in float32 the rows int8 is unsure of, for "
                          f"text-classification with model.quantize; got model.task={m.task}, model.quantize="
                          f"{m.quantize}: set model.quantize=int8-per-channel, or model.rescore_margin=0")
    _check_runtime(m)
    if not d.path:
        raise ConfigError("data.path is required: a Parquet file, directory or glob")
    if not d.text_column:
        raise ConfigError("data.text_column is required: the name of the column holding the text")
    if len(set(d.id_columns)) != len(d.id_columns):
        raise ConfigError(f"data.id_columns has duplicates: {d.id_columns}")
    if not o.path:
        raise ConfigError("output.path is required: the directory the predictions are written to")
    if o.mode == "append" and o.format != "delta":
        raise ConfigError(f"output.mode must be one of error, overwrite, resume for output.format={o.format} (got "
                          "append, which adds rows to a Delta table): set output.format=delta to append")
    _check_long_texts(cfg)
    if m.task == "zero-shot-classification" and not cfg.zero_shot.candidate_labels:
        raise ConfigError("zero_shot.candidate_labels is required for model.task=zero-shot-classification, e.g. [sports, politics]")
    if m.task == "zero-shot-classification" and "{}" not in cfg.zero_shot.hypothesis_template:
        raise ConfigError(f"zero_shot.hypothesis_template must contain '{{}}' where the label goes; got {cfg.zero_shot.hypothesis_template!r}")
    return cfg


def _check_runtime(m: ModelConfig) -> None:
    if m.runtime == "eager":
        if m.quantize == "int8-blockwise":
            raise ConfigError("model.quantize=int8-blockwise is ONNX Runtime's int8 (MatMulNBits); set "
                              "model.runtime=onnxruntime with it, or use model.quantize=int8-per-channel in torch")
        return
    if m.task == "text-generation":
        raise ConfigError("model.runtime=onnxruntime does not run text-generation (its decoding loop is torch's); "
                          "use model.runtime=eager")
    if m.dtype not in ("auto", "float32"):
        raise ConfigError(f"model.runtime=onnxruntime runs float32 on CPU (or int8, with model.quantize); set "
                          f"model.dtype=float32 (got model.dtype={m.dtype}), or use model.runtime=eager for other "
                          "precisions (with model.dtype=auto-check, which tries ONNX Runtime itself)")


def _check_long_texts(cfg: JobConfig) -> None:
    m = cfg.model
    if m.chunk_aggregation != "mean" and m.task not in ("text-classification", "zero-shot-classification"):
        raise ConfigError(f"model.chunk_aggregation={m.chunk_aggregation} applies to text-classification and "
                          f"zero-shot-classification; model.task={m.task} assembles its windows its own way, "
                          "remove model.chunk_aggregation")
    if m.long_texts != "chunk":
        return
    if m.task == "text-generation":
        raise ConfigError("model.long_texts=chunk cannot be used with model.task=text-generation: a prompt is cut "
                          "from the left, keeping the end the continuation follows; use model.long_texts=truncate")
    if cfg.data.text_pair_column and m.task == "text-classification":
        raise ConfigError(f"model.long_texts=chunk splits one text into windows, not a pair (data.text_pair_column="
                          f"{cfg.data.text_pair_column}); use model.long_texts=truncate for text pairs")
    if m.task == "token-classification" and cfg.token_classification.aggregation == "none":
        raise ConfigError("model.long_texts=chunk merges entities found in overlapping windows, which needs "
                          "token_classification.aggregation simple, first, average or max (got none), as "
                          "transformers' pipeline with stride does")
    if m.stride >= m.max_length:
        raise ConfigError(f"model.stride={m.stride} must be smaller than model.max_length={m.max_length} (windows of "
                          "max_length tokens, each sharing model.stride tokens with the one before); lower model.stride")


# model.path values that name a model in an MLflow store rather than a directory.
MODEL_URI_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def is_model_uri(path: str) -> bool:
    return path.startswith(MODEL_URI_SCHEMES)


def _is_local(path: str) -> bool:
    return "://" not in path and not is_model_uri(path) and not path.startswith("dbfs:")


_PATH_KEYS = (("model", "path"), ("data", "path"), ("output", "path"),
              ("mlflow", "tracking_uri"), ("mlflow", "artifact_location"))


def _resolve(value: Any, base: str) -> Any:
    if not isinstance(value, str) or not value:
        return value
    if value.startswith("sqlite:///") and not value.startswith("sqlite:////"):
        return "sqlite:///" + os.path.normpath(os.path.join(base, value[len("sqlite:///"):]))
    if _is_local(value) and value not in ("databricks",):
        return os.path.normpath(os.path.join(base, os.path.expanduser(value)))
    return value


def _resolve_paths(tree: Dict[str, Any], base: str) -> None:
    """Make local paths absolute: ranks (Spark executors, other hosts) may start elsewhere."""
    for section, key in _PATH_KEYS:
        sec = tree.get(section)
        if isinstance(sec, dict) and key in sec:
            sec[key] = _resolve(sec[key], base)


def load_config(source: Union[str, Dict[str, Any], JobConfig, None] = None,
                overrides: Optional[List[str]] = None, **kw_overrides: Any) -> JobConfig:
    """Build a validated JobConfig from a YAML path, a dict or a JobConfig, plus overrides.

    overrides: ["data.batch_size=64", ...]; kw_overrides: {"data.batch_size": 64} or
    {"data": {"batch_size": 64}}.
    """
    if source is None:
        source = DEFAULT_CONFIG
    if isinstance(source, JobConfig):
        tree = source.to_dict()
    elif isinstance(source, dict):
        tree = dict(source)
    else:
        path = os.fspath(source)
        if not os.path.exists(path):
            raise ConfigError(f"config file {path} does not exist")
        with open(path) as f:
            try:
                tree = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections (model:, data:, ...)")
        # Relative paths in a config file are relative to that file, as in docker-compose.
        tree = _deep_copy(tree)
        _resolve_paths(tree, os.path.dirname(os.path.abspath(path)))
    tree = _deep_copy(tree)
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    for key, value in kw_overrides.items():
        if isinstance(value, dict) and "." not in key:
            for sub, v in value.items():
                _set_dotted(tree, f"{key}.{sub}", v)
        else:
            _set_dotted(tree, key, value)
    _resolve_paths(tree, os.getcwd())
    cfg = _build(JobConfig, tree, "")
    _default_tracking(cfg.mlflow)
    return validate(cfg)


def _default_tracking(m: MlflowConfig) -> None:
    """Decided on the launcher, so every rank (wherever it starts) logs to the same store."""
    if not m.tracking_uri:
        m.tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.abspath('mlflow.db')}"
    if not m.artifact_location and m.tracking_uri.startswith("sqlite:///"):
        m.artifact_location = os.path.join(os.path.dirname(m.tracking_uri[len("sqlite:///"):]), "mlartifacts")


def _deep_copy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _deep_copy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_deep_copy(v) for v in tree]
    return tree

"""output.format=delta: the Delta table at output.path, through the deltalake package (no Spark).

    check_table(cfg, schema)                          # before any rank starts: the table takes this job's columns
    version = commit(cfg, parts, schema, job, mode)   # rank 0, every part written: all of them, one transaction

The ranks write their Parquet parts as for output.format=parquet (hvd_infer.writer); only rank 0 writes
the log, once, at the end, so readers see the whole job or none of it. deltalake is imported inside these
functions only. The table keeps protocol 1/2 with no table features, which every Delta reader reads.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Tuple

import pyarrow as pa

from hvd_infer.config import JobConfig
from hvd_infer.errors import ConfigError, OutputError
from hvd_infer.storage import first_line

DELTA_LOG = "_delta_log"  # the table's log, under its root

# fsspec's (s3fs) storage_options and their names in deltalake (object_store) for s3://.
_S3_OPTIONS = {"key": "AWS_ACCESS_KEY_ID", "secret": "AWS_SECRET_ACCESS_KEY", "token": "AWS_SESSION_TOKEN",
               "endpoint_url": "AWS_ENDPOINT_URL", "region_name": "AWS_REGION",
               "aws_access_key_id": "AWS_ACCESS_KEY_ID", "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
               "aws_session_token": "AWS_SESSION_TOKEN"}
# The AWS_* variables boto3 (and so s3fs) reads and their names in deltalake; of two giving one, the later wins.
_S3_ENV = [("AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"), ("AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY"),
           ("AWS_SESSION_TOKEN", "AWS_SESSION_TOKEN"), ("AWS_DEFAULT_REGION", "AWS_REGION"),
           ("AWS_REGION", "AWS_REGION"), ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL"),
           ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")]


def require() -> None:
    """output.format=delta where deltalake is not installed: one line, before any rank starts."""
    try:
        import deltalake  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"output.format=delta needs the deltalake package, which is not installed here ({e}); "
                          "pip install deltalake (or pip install 'hvd_infer[delta]'), or set output.format=parquet") \
            from None


def is_table(names: List[str]) -> bool:
    """Whether the files of a root (Location.names) hold a Delta table's log."""
    return any(n.startswith(DELTA_LOG + "/") for n in names)


def storage_options(url: str, options: Dict[str, Any]) -> Dict[str, str]:
    """output.storage_options as deltalake reads them. For s3:// fsspec's names (key, secret, endpoint_url,
    client_kwargs) and the AWS_* variables become deltalake's, options first; as only rank 0 ever commits, S3's
    missing atomic rename is allowed unless a locking provider is set. Elsewhere the options pass as they are."""
    if url.split("://", 1)[0] not in ("s3", "s3a"):
        return {k: str(v) for k, v in options.items() if not isinstance(v, dict)}
    out = {theirs: os.environ[ours] for ours, theirs in _S3_ENV if os.environ.get(ours)}
    nested = options.get("client_kwargs") or {}
    for given in (nested, options):
        for k, v in given.items():
            if k in _S3_OPTIONS and v is not None:
                out[_S3_OPTIONS[k]] = str(v)
            elif k.isupper():  # already in deltalake's words
                out[k] = str(v)
    if options.get("anon"):
        out["AWS_SKIP_SIGNATURE"] = "true"
    if out.get("AWS_ENDPOINT_URL", "").startswith("http://"):
        out.setdefault("AWS_ALLOW_HTTP", "true")
    if not (out.get("AWS_S3_LOCKING_PROVIDER") or os.environ.get("AWS_S3_LOCKING_PROVIDER")):
        out.setdefault("AWS_S3_ALLOW_UNSAFE_RENAME", "true")
    return out


def _table(cfg: JobConfig):
    """The table at output.path (which holds a _delta_log), opened; OutputError when it cannot be read."""
    from deltalake import DeltaTable

    try:
        return DeltaTable(cfg.output.path, storage_options=storage_options(cfg.output.path, cfg.output.storage_options))
    except Exception as e:
        raise OutputError(f"output.path {cfg.output.path} has a {DELTA_LOG} that deltalake cannot read "
                          f"({first_line(e)}); repair the table, or choose a new path") from None


def _columns(schema) -> Dict[str, str]:
    """A deltalake Schema's columns and their types, as Delta names them."""
    return {f["name"]: _type_name(f["type"]) + ("" if f["nullable"] else " not null")
            for f in json.loads(schema.to_json())["fields"]}


def _type_name(t: Any) -> str:
    if isinstance(t, str):
        return t
    if t["type"] == "array":
        return f"array<{_type_name(t['elementType'])}>"
    if t["type"] == "map":
        return f"map<{_type_name(t['keyType'])}, {_type_name(t['valueType'])}>"
    return "struct<" + ", ".join(f"{f['name']}: {_type_name(f['type'])}" for f in t["fields"]) + ">"


def _differences(table_schema, job_schema: pa.Schema) -> str:
    """What differs between a table's columns and the job's ('' when nothing does), in words."""
    from deltalake import Schema

    theirs, ours = _columns(table_schema), _columns(Schema.from_arrow(job_schema))
    said = [f"{n} (table {theirs[n]}, job {ours[n]})" for n in ours if n in theirs and theirs[n] != ours[n]]
    missing, new = [n for n in theirs if n not in ours], [n for n in ours if n not in theirs]
    if missing:
        said.append(f"not in the job: {', '.join(missing)}")
    if new:
        said.append(f"not in the table: {', '.join(new)}")
    return "; ".join(said)


def check_table(cfg: JobConfig, schema: pa.Schema) -> None:
    """The Delta table at output.path takes this job's columns, or OutputError naming those that differ."""
    differ = _differences(_table(cfg).schema(), schema)
    if differ:
        raise OutputError(f"output.path {cfg.output.path} is a Delta table whose columns differ from this job's: "
                          f"{differ}; write to a new path, or give the job the table's columns (data.id_columns, "
                          "model.task)")


def commit(cfg: JobConfig, parts: List[Tuple[str, int, int]], schema: pa.Schema, job: str, mode: str) -> int:
    """Rank 0, once every part is written: (name, bytes, rows) of each, added to the table (created if need be)
    in one commit, which with mode=overwrite also removes the table's other files; returns the table's version.
    The commit carries the job as a Delta transaction id (appId hvd_infer-<job>), so it is never made twice."""
    from deltalake import DeltaTable, Schema
    from deltalake.transaction import AddAction, CommitProperties, Transaction, create_table_with_add_actions

    uri = cfg.output.path
    options = storage_options(uri, cfg.output.storage_options)
    app_id = f"hvd_infer-{job}"
    now = int(time.time() * 1000)
    actions = [AddAction(name, size, {}, now, True, json.dumps({"numRecords": rows})) for name, size, rows in parts]
    props = CommitProperties(custom_metadata={"hvd_infer.job": job}, app_transactions=[Transaction(app_id, 1)])
    try:
        if DeltaTable.is_deltatable(uri, options):
            table = DeltaTable(uri, storage_options=options)
            if table.transaction_version(app_id) is not None:
                return _committed_version(table, job)
            table.create_write_transaction(actions, mode, table.schema(), commit_properties=props)
        else:
            create_table_with_add_actions(uri, Schema.from_arrow(schema), actions, mode="error",
                                          storage_options=options, commit_properties=props)
        return DeltaTable(uri, storage_options=options).version()
    except Exception as e:
        raise OutputError(f"output.path {uri}: the Delta commit of this job's {len(parts)} parts failed "
                          f"({first_line(e)}); the parts are kept: rerun with output.mode=resume to commit "
                          "them") from None


def _committed_version(table, job: str) -> int:
    """The version whose commit added this job's parts (history is newest first)."""
    for entry in table.history():
        if entry.get("hvd_infer.job") == job:
            return int(entry["version"])
    return table.version()

"""Where files live: a local directory or an object-store prefix (s3://, gs://, abfss://), through fsspec.

    loc = Location("s3://bucket/preds", {"anon": False})
    loc.put("part-r00000-....parquet", data)    # whole or absent, local or remote
    loc.names()                                 # every object under the prefix, relative

A file is written whole or not at all: by one PUT (or a multipart upload the store shows only once
complete) on an object store, by temp name and rename on a local disk. Credentials come the store's
usual way plus the config's storage_options, passed to fsspec as they are.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Type

import fsspec
from fsspec.implementations.local import LocalFileSystem

from hvd_infer.errors import UserError


class Location:
    """A directory or prefix and the filesystem that reaches it."""

    def __init__(self, url: str, storage_options: Optional[Dict[str, Any]] = None):
        self.url = url.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self.root = root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)

    def path(self, name: str) -> str:
        """The filesystem path of name (relative to the root)."""
        return f"{self.root}/{name}"

    def url_of(self, name: str) -> str:
        """What a user (or pyarrow, Spark) would call name: a local path or a full URL."""
        return os.path.join(self.url, name) if self.local else f"{self.url}/{name}"

    def put(self, name: str, data: bytes) -> None:
        """Write name whole or not at all."""
        path = self.path(name)
        if self.local:
            parent, base = os.path.split(path)
            os.makedirs(parent, exist_ok=True)
            tmp = os.path.join(parent, f".{base}.tmp-{os.getpid()}")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def read(self, name: str) -> bytes:
        return self.fs.cat_file(self.path(name))

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def names(self) -> List[str]:
        """Every file under the root, relative to it (an empty list for a root not there yet)."""
        return sorted(self.sizes())

    def sizes(self) -> Dict[str, int]:
        """Every file under the root, relative to it, and its size in bytes (from one listing)."""
        if self.local and not os.path.isdir(self.root):
            return {}
        self.fs.invalidate_cache(self.root)  # other ranks and processes write here: list afresh
        found = self.fs.find(self.root, detail=True)  # a missing bucket, bad credentials, a dead endpoint fail here
        if not found and not self.local:
            self.fs.info(self.root.split("/", 1)[0])  # some stores list a missing bucket as empty
        return {p[len(self.root) + 1:]: info["size"] for p, info in found.items() if p.startswith(self.root + "/")}

    def delete(self, names: List[str]) -> None:
        if names:
            self.fs.rm([self.path(n) for n in names])


def first_line(error: BaseException) -> str:
    """The first line of an error's message, or its type's name when it has none."""
    return (str(error).splitlines() or [type(error).__name__])[0]


def explain(error: BaseException, key: str, url: str, kind: Type[UserError]) -> Optional[UserError]:
    """A one-line user error for a store's failure (None when it is not the user's to fix)."""
    first = first_line(error)
    name = type(error).__name__
    hint = None
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        hint = "no credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or key/secret in " \
               f"{key.rsplit('.', 1)[0]}.storage_options"
    elif isinstance(error, PermissionError):
        hint = f"access denied ({first}): check the credentials and that they may list and write {url}"
    elif name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError") or \
            isinstance(error, (ConnectionError, TimeoutError)):
        hint = f"the endpoint does not answer ({first}): check AWS_ENDPOINT_URL or endpoint_url in " \
               f"{key.rsplit('.', 1)[0]}.storage_options"
    elif isinstance(error, FileNotFoundError):
        hint = f"not found ({first}): does the bucket exist?"
    elif isinstance(error, ImportError) or (isinstance(error, ValueError) and "protocol" in first.lower()):
        hint = f"{first} (the fsspec package for this store is missing: s3fs, gcsfs or adlfs)"
    return kind(f"{key} {url}: {hint}") if hint else None

"""Local paths and ``s3://`` URIs behind one interface (pyarrow filesystems).

S3 credentials come from the environment or the instance role only (pyarrow's default chain);
an S3-compatible store is reached through ``endpoint`` (config) or ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import hashlib
import json
import os
from urllib.parse import urlparse

import pyarrow.fs as pafs

__all__ = ["resolve", "join", "write_bytes", "read_bytes", "exists", "write_json", "read_json", "sha256_file",
           "list_files", "is_remote"]


def is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


def resolve(uri: str, endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or ``s3://bucket/prefix``."""
    if is_remote(uri):
        endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL")
        kwargs = {}
        if endpoint:
            parsed = urlparse(endpoint)
            kwargs = dict(endpoint_override=parsed.netloc or endpoint, scheme=parsed.scheme or "https")
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs), uri[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write whole or not at all: local files go through a temp name and a rename; an S3 PUT of
    one object is already atomic."""
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{os.getpid()}"
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        fs.move(tmp, path)
    else:
        with fs.open_output_stream(path) as out:
            out.write(data)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_json(fs: pafs.FileSystem, path: str, payload) -> None:
    write_bytes(fs, path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def read_json(fs: pafs.FileSystem, path: str):
    return json.loads(read_bytes(fs, path))


def sha256_file(fs: pafs.FileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def list_files(fs: pafs.FileSystem, path: str, suffixes: tuple[str, ...]) -> list[str]:
    """Files under ``path`` (or ``path`` itself) with one of ``suffixes``, sorted."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(path)
    if info.type == pafs.FileType.File:
        return [path]
    selector = pafs.FileSelector(path, recursive=True)
    return sorted(f.path for f in fs.get_file_info(selector)
                  if f.type == pafs.FileType.File and f.path.endswith(suffixes))

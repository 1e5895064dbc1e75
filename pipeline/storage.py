"""Local paths and ``s3://`` URIs behind one interface (pyarrow filesystems).

S3 credentials come from the environment or the instance role only (pyarrow's default chain);
an S3-compatible store is reached through ``endpoint`` (config) or ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import posixpath
import time
from pathlib import Path
from typing import Callable, TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

from pipeline.checks import env_seconds

__all__ = ["resolve", "join", "write_bytes", "read_bytes", "exists", "write_json", "read_json", "sha256_file",
           "list_files", "list_dir", "is_remote", "location", "overlaps", "confined", "require_credentials", "StorageError", "retrying", "RETRY_ENV"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long one object-store operation keeps retrying a network failure (an S3 endpoint that times
# out, restarts or drops connections) before the run fails naming the object. Read at each call,
# so a job's runtime environment can set it; 120 s rides out a restarting endpoint without hiding
# one that is down.
RETRY_ENV = "WAND_STORAGE_RETRY_S"
DEFAULT_RETRY_S = 120.0
# Failures that no retry fixes: wrong credentials, a missing bucket, a denied request.
PERMANENT = ("ACCESS_DENIED", "AccessDenied", "NO_SUCH_BUCKET", "NoSuchBucket", "InvalidAccessKeyId",
             "INVALID_ACCESS_KEY_ID", "SignatureDoesNotMatch", "SIGNATURE_DOES_NOT_MATCH")


class StorageError(OSError):
    """A storage operation that failed for good; the message names the object (and so the bucket)."""


def retry_seconds() -> float:
    return env_seconds(RETRY_ENV, DEFAULT_RETRY_S)


def retrying(fs: pafs.FileSystem, what: str, path: str, call: Callable[[], T]) -> T:
    """``call()``, retried with exponential backoff while an object store answers with network
    errors, for up to ``WAND_STORAGE_RETRY_S`` seconds; then a ``StorageError`` naming ``path``.
    Local filesystems are not retried (a full disk or a missing folder does not heal by waiting)."""
    if isinstance(fs, pafs.LocalFileSystem):
        return call()
    deadline, delay = time.monotonic() + retry_seconds(), 0.5
    while True:
        try:
            return call()
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError):
            raise  # an answer, not an outage: callers handle these themselves
        except OSError as err:
            if any(marker in str(err) for marker in PERMANENT):
                raise StorageError(f"storage: {what} s3://{path} failed: {err}") from err
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StorageError(f"storage: {what} s3://{path} still failing after {retry_seconds():.0f} s of "
                                   f"retries (is the object store at this endpoint up? {RETRY_ENV} sets how long "
                                   f"to wait): {err}") from err
            log.warning("storage: %s s3://%s failed (%s); retrying in %.1f s", what, path, str(err)[:200],
                        min(delay, remaining))
            time.sleep(min(delay, remaining))
            delay = min(2 * delay, 10.0)


def is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


def location(uri: str) -> tuple[str, ...]:
    """Where ``uri`` points, as path parts that compare equal for the same place however it is
    spelled: ``s3://b//p/`` and ``s3://b/p``; ``./x``, ``x/`` and a symlink to ``x`` (local)."""
    if is_remote(uri):
        parts = [p for p in uri[len("s3://"):].split("/") if p not in ("", ".")]
        return ("s3:",) + tuple(posixpath.normpath("/".join(parts)).split("/")) if parts else ("s3:",)
    return Path(os.path.expanduser(uri)).resolve().parts


def confined(root: str, name: str, fs: pafs.FileSystem | None = None, what: str = "a stored file") -> str:
    """``root/name`` for a ``name`` read from a stored file (a manifest, a checksum list): relative,
    no ``..``, no backslash, and, on a local disk, not a symlink out of ``root``. Anything else is a
    ValueError naming it (a manifest must not make us open /etc/... or /dev/zero)."""
    parts = name.split("/") if isinstance(name, str) else []
    if (not parts or name.startswith("/") or "\\" in name or "\x00" in name
            or any(p in ("", ".", "..") for p in parts)):
        raise ValueError(f"{what} names {str(name)[:120]!r}: only a relative path inside its own folder is allowed")
    path = join(root, name)
    if fs is None or isinstance(fs, pafs.LocalFileSystem):
        real_root = os.path.realpath(root)
        if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
            raise ValueError(f"{what} names {name!r}, a link that leads out of {root}")
    return path


def overlaps(a: str, b: str) -> bool:
    """Whether one location is, or holds, the other (a folder and a file inside it overlap)."""
    left, right = location(a), location(b)
    shorter = min(len(left), len(right))
    return left[:shorter] == right[:shorter]


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


def require_credentials(*uris: str | None) -> None:
    """Fail before anything is written when an ``s3://`` location is named but no credentials can
    be found (environment, shared files, web identity, container or instance role: botocore's own
    chain). Credentials never come from configs, so the error says where they do come from."""
    remote = [u for u in uris if u and is_remote(u)]
    if not remote:
        return
    import botocore.session

    if botocore.session.get_session().get_credentials() is None:
        raise StorageError(
            f"{remote[0]}: no S3 credentials found. Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) "
            "in the job's environment, or run where an instance or pod role provides them; configs never hold them")


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return retrying(fs, "looking up", path, lambda: fs.get_file_info(path).type != pafs.FileType.NotFound)


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write whole or not at all: local files go through a temp name and a rename (a full disk
    leaves no file at ``path`` and no temp file behind); an S3 PUT of one object is already atomic."""
    parent = path.rsplit("/", 1)[0]
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            fs.create_dir(parent, recursive=True)
            with fs.open_output_stream(tmp) as out:
                out.write(data)
            fs.move(tmp, path)
        except OSError as err:
            if os.path.exists(tmp):
                os.remove(tmp)
            full = getattr(err, "errno", None) in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) or "No space" in str(err) \
                or "too large" in str(err)
            raise StorageError(f"storage: could not write {path} ({len(data)} bytes)"
                               f"{' - the disk is full or over its size limit' if full else ''}: {err}") from err
        return

    def put() -> None:
        fs.create_dir(parent, recursive=True)
        with fs.open_output_stream(path) as out:
            out.write(data)

    retrying(fs, "writing", path, put)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    def get() -> bytes:
        with fs.open_input_stream(path) as stream:
            return stream.read()

    return retrying(fs, "reading", path, get)


def write_json(fs: pafs.FileSystem, path: str, payload) -> None:
    write_bytes(fs, path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def read_json(fs: pafs.FileSystem, path: str):
    return json.loads(read_bytes(fs, path))


def sha256_file(fs: pafs.FileSystem, path: str) -> str:
    def digest() -> str:
        hasher = hashlib.sha256()
        with fs.open_input_stream(path) as stream:
            while chunk := stream.read(1 << 20):
                hasher.update(chunk)
        return hasher.hexdigest()

    return retrying(fs, "reading", path, digest)


def list_files(fs: pafs.FileSystem, path: str, suffixes: tuple[str, ...]) -> list[str]:
    """Files under ``path`` (or ``path`` itself) with one of ``suffixes``, sorted."""
    info = retrying(fs, "looking up", path, lambda: fs.get_file_info(path))
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(path)
    if info.type == pafs.FileType.File:
        return [path]
    selector = pafs.FileSelector(path, recursive=True)
    return sorted(f.path for f in retrying(fs, "listing", path, lambda: fs.get_file_info(selector))
                  if f.type == pafs.FileType.File and f.path.endswith(suffixes))


def list_dir(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    """The entries directly under ``path`` (retried like every other object-store call)."""
    return retrying(fs, "listing", path, lambda: fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))

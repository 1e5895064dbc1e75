"""Ray's logs off a node before the autoscaler removes it: a loop that copies every new or changed
file under a node's log folder to storage (``s3://bucket/prefix`` on a cluster), and once more when
the node is being stopped (SIGTERM), so an idle-terminated or reclaimed worker's raylet, worker and
Ray Train logs stay readable after the node is gone.

Layout on storage: ``<dest>/<node>/<session>/<path under the log folder>``: ``node`` defaults to the
host name (one pod or instance), ``session`` is the Ray session folder the logs belong to (a node
restarted by Ray writes a new session, never over the old one). A file is uploaded whole each time
its size or modification time changes (Ray's logs rotate at 512 MiB, so a pass is bounded).
Run by ``python -m jobs.ship_logs`` (cluster/aws.yaml's start commands, KubeRay's sidecar).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

from pipeline import storage

log = logging.getLogger(__name__)


class LogShipper:
    def __init__(self, source: str | Path, dest: str, node: str | None = None, endpoint: str | None = None):
        self.source = Path(source)
        self.dest = dest.rstrip("/")
        self.node = node or socket.gethostname()
        if not self.node or "/" in self.node or self.node in {".", ".."}:
            raise ValueError(f"--node {self.node!r}: one folder name, no '/'")
        self.fs, self.root = storage.resolve(self.dest, endpoint)
        self.seen: dict[Path, tuple[int, int]] = {}  # file -> (size, mtime_ns) last uploaded

    def session_folder(self) -> tuple[str, Path] | None:
        """(session name, log folder) for ``source``: a Ray ``session_latest`` / ``session_*`` folder
        (its ``logs``), or a plain folder of logs (named ``logs``). None while it does not exist."""
        if not self.source.exists():
            return None
        resolved = self.source.resolve()
        logs = resolved / "logs" if (resolved / "logs").is_dir() else resolved
        session = next((p.name for p in (logs, *logs.parents) if p.name.startswith("session_")), "logs")
        return session, logs

    def sync_once(self) -> int:
        """Upload every file whose size or mtime changed since it was last uploaded; their count."""
        found = self.session_folder()
        if found is None:
            return 0
        session, logs = found
        uploaded = 0
        for path in sorted(p for p in logs.rglob("*") if p.is_file() and not p.is_symlink()):
            try:
                stat = path.stat()
                key = (stat.st_size, stat.st_mtime_ns)
                if self.seen.get(path) == key:
                    continue
                data = path.read_bytes()
            except FileNotFoundError:  # rotated or removed between the listing and the read
                continue
            target = storage.join(self.root, self.node, session, path.relative_to(logs).as_posix())
            storage.write_bytes(self.fs, target, data)
            self.seen[path] = key
            uploaded += 1
        return uploaded

    def run(self, every: float, stop: threading.Event | None = None) -> int:
        """Sync every ``every`` seconds until SIGTERM / SIGINT (or ``stop``), then once more; files
        uploaded in all. A failed pass (storage down) is logged and retried at the next one."""
        stop = stop or threading.Event()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: stop.set())
        total, waiting_since = 0, None
        log.info("shipping %s to %s/%s every %g s", self.source, self.dest, self.node, every)
        while True:
            final = stop.is_set()
            if self.session_folder() is None and waiting_since is None:
                waiting_since = time.monotonic()
                log.info("waiting for %s (Ray creates it when the node starts)", self.source)
            try:
                count = self.sync_once()
                total += count
                if count:
                    log.info("%d file(s) shipped (%d in all)", count, total)
            except OSError as err:
                if final:
                    raise
                log.warning("this pass failed, retrying in %g s: %s", every, err)
            if final:
                log.info("stopped: %d file(s) shipped in all", total)
                return total
            stop.wait(every)


def default_source() -> str:
    """Ray's log folder of the node's newest session (Ray's default temp dir, or $RAY_TMPDIR)."""
    return os.path.join(os.environ.get("RAY_TMPDIR", "/tmp/ray"), "session_latest")

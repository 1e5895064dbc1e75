"""Test helpers: random sequences in each spec's layout (see pipeline/random_corpus.py)."""

from pipeline.random_corpus import corpus_rows, make_row  # noqa: F401


def ray_auth_headers() -> dict[str, str]:
    """The bearer header for this process's Ray token (RAY_AUTH_TOKEN_PATH, set by conftest)."""
    import os
    from pathlib import Path

    return {"Authorization": "Bearer " + Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text().strip()}


def ray_session_dirs(gcs_port: int) -> list:
    """The session folders (/tmp/ray/session_*) of the live Ray cluster whose GCS is on ``gcs_port``,
    read off its processes' command lines."""
    import re
    from pathlib import Path

    import psutil

    found = set()
    for proc in psutil.process_iter(["cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        if f":{gcs_port}" in line:
            found.update(re.findall(r"(/\S*?/session_[0-9_-]+)(?=[/\s]|$)", line))
    return sorted(Path(p) for p in found if Path(p).is_dir())


def _files_with(needle: bytes, roots) -> tuple[int, list[str]]:
    import stat
    from pathlib import Path

    scanned, hits = 0, []
    for root in roots:
        for path in Path(root).rglob("*"):
            try:
                if not stat.S_ISREG(path.lstat().st_mode) or path.stat().st_size > 200_000_000:
                    continue
                scanned += 1
                if needle in path.read_bytes():
                    hits.append(str(path))
            except OSError:
                continue
    return scanned, hits


def token_leaks(token: str, runs_dir, mlflow_client, experiment_id: str, texts: list[str], ray_dirs) -> dict:
    """Where ``token`` appears: files under ``runs_dir``, MLflow params, tags and artifacts of every run
    in the experiment, the given texts (job logs), and Ray's session folders. Returns the counts of
    what was looked at (so a caller can check that the search saw something) and the places found."""
    import tempfile

    found = []
    files, hits = _files_with(token.encode(), [runs_dir])
    found += hits
    checked = 0
    with tempfile.TemporaryDirectory() as tmp:
        for run in mlflow_client.search_runs([experiment_id]):
            for kind, values in (("param", run.data.params), ("tag", run.data.tags)):
                for key, value in values.items():
                    checked += 1
                    if token in f"{key}={value}":
                        found.append(f"mlflow {kind} {key} of run {run.info.run_id}")
            dst = mlflow_client.download_artifacts(run.info.run_id, "", tmp)
            count, hits = _files_with(token.encode(), [dst])
            checked += count
            found += [f"mlflow artifact {h}" for h in hits]
    found += [f"text #{i}" for i, text in enumerate(texts) if token in text]
    ray_files, hits = _files_with(token.encode(), ray_dirs)
    found += hits
    return {"files": files, "mlflow": checked, "ray logs": ray_files, "found": found}

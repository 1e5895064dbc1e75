"""Compare experiments (one row per model's parent run) from an MLflow tracking server.

    python -m jobs.compare --tracking-uri http://127.0.0.1:5000
    python -m jobs.compare --tracking-uri http://127.0.0.1:5000 --experiment-name wand-tts --match tiny-

Prints the same table `jobs/distill.py` ends with, for every finished parent run: KV cache at 60 s
(full vs WAND), step-time flatness, theoretical attention FLOPs ratio, the student's top-1
agreement with its teacher near / mid / far from the prefix, and KL at far positions.
"""

from __future__ import annotations

import argparse
import os
import sys

from pipeline.evals.report import results_table, rows_from_server
from pipeline.redaction import redact


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        help="MLflow server (default: $MLFLOW_TRACKING_URI)")
    parser.add_argument("--experiment-name", default="wand-tts")
    parser.add_argument("--match", default=None, help="only experiments whose name contains this")
    args = parser.parse_args(argv)
    if not args.tracking_uri:
        parser.error("--tracking-uri (or MLFLOW_TRACKING_URI) is required")
    from pipeline.services import wait_http

    shown = redact(args.tracking_uri)  # a URI may hold user:password@ or ?token=: never printed
    if args.tracking_uri.startswith("http"):
        try:
            wait_http(f"{args.tracking_uri.rstrip('/')}/health", 5, what="MLflow server")
        except RuntimeError as err:
            parser.error(redact(f"--tracking-uri: {err} (is it running? `make demo` starts one on 127.0.0.1:5000)"))
    try:
        rows = rows_from_server(args.tracking_uri, args.experiment_name, args.match)
    except Exception as err:  # MLflow's errors quote the URI they failed on
        raise SystemExit(redact(f"compare: reading runs from {shown} failed: {type(err).__name__}: {err}")) from None
    if not rows:
        print(f"no wand-tts parent runs in '{args.experiment_name}' at {shown}")
        return 1
    print(results_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Copy a node's Ray logs to storage until the node stops, so they outlive it (autoscaler idle
teardown, spot reclaim, pod deletion).

    python -m jobs.ship_logs --to s3://YOUR-BUCKET/wand/ray-logs
    python -m jobs.ship_logs --to s3://YOUR-BUCKET/wand/ray-logs --source /tmp/ray/session_latest --every 30 --node "$HOSTNAME"

Started next to `ray start` on every node (cluster/aws.yaml's start commands; a sidecar container
sharing /tmp/ray in cluster/kuberay/). Every `--every` seconds, each new or changed file under the
session's logs/ is uploaded to <to>/<node>/<session>/<path>; on SIGTERM / SIGINT (the node being
stopped) one last pass runs, then it exits. It waits for the source folder when Ray has not created
it yet. S3 credentials come from the environment or the node's role, never from arguments.
"""

from __future__ import annotations

import argparse
import sys

from pipeline import storage
from pipeline.cli import setup_logging
from pipeline.logship import LogShipper, default_source


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--to", required=True, help="where the logs go: s3://bucket/prefix (a local folder for a try)")
    parser.add_argument("--source", default=default_source(),
                        help="the node's Ray session folder or a folder of logs (default: %(default)s)")
    parser.add_argument("--every", type=float, default=30.0, help="seconds between passes (default: %(default)s)")
    parser.add_argument("--node", default=None, help="this node's folder under --to (default: the host name)")
    parser.add_argument("--s3-endpoint", default=None, help="an S3-compatible endpoint (default: AWS, or $AWS_ENDPOINT_URL)")
    args = parser.parse_args(argv)
    if args.every <= 0:
        parser.error(f"--every {args.every}: must be > 0 seconds")
    setup_logging()
    try:
        storage.require_credentials(args.to)
        shipper = LogShipper(args.source, args.to, args.node, args.s3_endpoint)
    except (ValueError, OSError) as err:
        print(f"ship_logs: {err}", file=sys.stderr)
        return 2
    shipper.run(args.every)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A local autoscaling cluster built from ``cluster/aws.yaml``: Ray's fake multi-node provider (each
worker "node" is an extra raylet on this machine) under autoscaler v2, with aws.yaml's node types.

What is kept from aws.yaml: every node type's name, ``min_workers`` / ``max_workers``, labels, the
head's zero resources, and the logical GPUs and ``accelerator_type:*`` resources (a GPU here is a
scheduling token only: the precompute and the evals fall back to the CPU when torch sees no CUDA).
What is scaled to this 2-core machine: CPUs per node (at most ``MAX_CPUS``: a raylet with 192 CPUs
would start that many workers), the cluster's ``max_workers`` (at most ``MAX_NODES`` raylets at
once) and the idle timeout (seconds, not minutes). The provider is Ray's fake one with one change
(``PerNodeRuntimeEnvProvider``): each fake node unpacks runtime environments into its own folder.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MAX_CPUS = 2
MAX_NODES = 4
# The fake provider's id for the head (Ray's own test clusters use it under autoscaler v2: the
# autoscaler matches the head's raylet to the provider's head instance by it).
FAKE_HEAD_TYPE = "ray.head.default"
FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"


def from_aws_yaml(gcs_port: int, idle_timeout_s: float = 6.0, path: Path = ROOT / "cluster" / "aws.yaml") -> dict:
    aws = yaml.safe_load(path.read_text())
    types = {}
    for name, node_type in aws["available_node_types"].items():
        resources = dict(node_type.get("resources", {}))
        if "CPU" in resources:
            resources["CPU"] = min(resources["CPU"], MAX_CPUS)
        types[name] = {"resources": resources, "node_config": {},
                       "min_workers": node_type.get("min_workers", 0),
                       "max_workers": node_type.get("max_workers", 0),
                       **({"labels": dict(node_type["labels"])} if node_type.get("labels") else {})}
    # The fake provider names its head's type "ray.head.default" (autoscaler v2 looks the head up by it).
    types[FAKE_HEAD_TYPE] = types.pop(aws["head_node_type"])
    types[FAKE_HEAD_TYPE]["max_workers"] = 0
    return {
        "cluster_name": f"{aws['cluster_name']}-fake",
        "max_workers": min(aws["max_workers"], MAX_NODES),
        "upscaling_speed": aws.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": idle_timeout_s / 60,
        # An external provider: the ray wheel does not ship the fake provider's default YAML.
        "provider": {"type": "external",
                     "module": "fake_cluster.PerNodeRuntimeEnvProvider",
                     "gcs_address": f"127.0.0.1:{gcs_port}", "launch_multiple": True,
                     "head_node_id": FAKE_HEAD_NODE_ID, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": types,
        "head_node_type": FAKE_HEAD_TYPE,
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def head_env() -> dict[str, str]:
    """What the head's processes (and so the autoscaler v2 monitor and its fake nodes) need; the
    monitor imports the provider from this folder."""
    return {"PYTHONPATH": str(Path(__file__).parent), "RAY_FAKE_CLUSTER": "1", "RAY_enable_autoscaler_v2": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID, "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID}


def _provider_class():
    from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider

    return FakeMultiNodeProvider


class PerNodeRuntimeEnvProvider(_provider_class()):
    """Ray's fake multi-node provider, each node with its own runtime-env folder. Fake nodes share
    this machine's session folder, and a node's runtime-env agent unpacks a job's working_dir with
    ``overwrite=True`` (remove, then unpack): a node starting mid-job would delete the working dir
    under the other nodes' running workers (their cwd vanishes). Real nodes have their own disks."""

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        import ray._private.node

        original = ray._private.node.Node

        def node(params, **kwargs):
            params.runtime_env_dir_name = f"runtime_resources_{params.env_vars['RAY_OVERRIDE_NODE_ID_FOR_TESTING']}"
            return original(params, **kwargs)

        with self.lock:  # the provider's lock: one node at a time, so the swap is seen by this call only
            ray._private.node.Node = node
            try:
                super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
            finally:
                ray._private.node.Node = original


def state(dashboard_url: str, headers: dict, kind: str, detail: bool = True) -> list[dict]:
    """One listing of Ray's state API (``nodes``, ``actors``, ``tasks``), dead entries included."""
    url = f"{dashboard_url}/api/v0/{kind}?detail={str(detail).lower()}&limit=10000"
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as response:
        return json.load(response)["data"]["result"]["result"]


class NodeWatch:
    """Polls autoscaler v2's cluster status (``ray.autoscaler.v2.sdk``: each running node with its
    node type) from a thread and remembers every worker node it saw: its type, when it was first and
    last seen, and the most worker nodes running at once. Each Ray node id maps to one node type."""

    def __init__(self, gcs_address: str, period: float = 0.5):
        import threading

        self.gcs_address, self.period = gcs_address, period
        self.types: dict[str, str] = {}      # Ray node id -> node type, every worker node ever seen
        self.alive: set[str] = set()         # worker nodes running at the last poll
        self.most_at_once = 0
        self.head_id = FAKE_HEAD_NODE_ID  # the head raylet's id (head_env)
        self.last_error: Exception | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "NodeWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def poll(self) -> None:
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(self.gcs_address)
        alive = set()
        for node in status.active_nodes + status.idle_nodes:
            if node.node_id is None:
                continue
            if node.node_id == self.head_id:
                continue
            self.types[node.node_id] = node.ray_node_type_name
            alive.add(node.node_id)
        self.alive = alive
        self.most_at_once = max(self.most_at_once, len(alive))

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.poll()
            except Exception as error:  # a poll during start-up or shutdown; the next one counts
                self.last_error = error

    def wait_workers(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.alive) != count:
            assert time.monotonic() < deadline, f"expected {count} running worker nodes within {timeout} s; " \
                                                f"running: {sorted(self.types[n] for n in self.alive)}; last poll error: {self.last_error!r}"
            time.sleep(0.5)

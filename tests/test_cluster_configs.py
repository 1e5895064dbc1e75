"""Every config in cluster/ loads and carries what Ray's launcher / the KubeRay operator require."""

from pathlib import Path

import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
TESTED = {"aws.yaml", "runtime_env.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/fields.yaml",
          "Dockerfile"}


def load(name):
    return yaml.safe_load((CLUSTER / name).read_text())


def test_every_cluster_config_is_tested_here():
    present = {str(p.relative_to(CLUSTER)) for p in CLUSTER.rglob("*") if p.is_file() and p.name != "README.md"}
    assert present == TESTED


def test_launcher_config_validates_against_rays_schema():
    from ray.autoscaler._private.util import validate_config

    config = load("aws.yaml")
    validate_config(config)  # ray/autoscaler/ray-schema.json, as `ray up` does
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0, "GPU": 0}  # the head schedules nothing
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    assert workers and all(w["min_workers"] == 0 and w["max_workers"] >= 1 for w in workers.values())
    assert {w["labels"]["wand-role"] for w in workers.values()} == {"cpu", "precompute", "train"}
    gpu_types = {w["node_config"]["InstanceType"].split(".")[0] for w in workers.values() if w["resources"]["GPU"]}
    assert gpu_types == {"g5", "p4d", "p5"}  # A10G, A100 and H100 classes
    markets = {w["node_config"].get("InstanceMarketOptions", {}).get("MarketType", "on-demand") for w in workers.values()}
    assert markets == {"spot", "on-demand"}
    assert sum(w["max_workers"] for w in workers.values()) >= config["max_workers"] > 0
    # Nothing floats: one image on every node (no pip at boot), an AMI named on every node type (never
    # the launcher's built-in default), one zone, SSH not open to the world.
    assert config["docker"]["image"] and not config["setup_commands"]
    assert all(t["node_config"]["ImageId"] for t in types.values())
    assert "," not in config["provider"]["availability_zone"]
    ssh = config["provider"]["security_group"]["IpPermissions"]
    assert all(r["CidrIp"] != "0.0.0.0/0" for rule in ssh for r in rule["IpRanges"])
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    # Token auth on every node; the token from a secret store to Ray's default path, not from this file.
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert "ray stop" in command or "RAY_AUTH_MODE=token ray start" in command or "jobs.ship_logs" in command, command
    # Every node ships its Ray logs to S3 (they outlive an idle-terminated node), one shipper each.
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        ship = [c for c in commands if "python -m jobs.ship_logs --to s3://" in c]
        assert len(ship) == 1 and ship[0].startswith("pkill -f jobs.ship_logs;") and ship[0].endswith("&"), commands
    fetch = [c for c in config["initialization_commands"] if "secretsmanager get-secret-value" in c]
    assert fetch and all("--region " in c and "~/.ray/auth_token" in c and "umask 077" in c for c in fetch)
    assert not any(">> ~/.bashrc" in c for c in config["initialization_commands"] + config["setup_commands"])
    text = (CLUSTER / "aws.yaml").read_text()
    assert "aws_secret_access_key" not in text.lower() and "AKIA" not in text


def test_the_autoscaling_tests_fake_cluster_is_aws_yaml_scaled_down():
    """tests/fake_cluster.py derives the end-to-end test's cluster from aws.yaml: same node types,
    min/max, labels and GPU resources (CPUs capped), and Ray's launcher schema accepts it."""
    from ray.autoscaler._private.util import validate_config

    import fake_cluster

    aws, fake = load("aws.yaml"), fake_cluster.from_aws_yaml(6379)
    validate_config(fake)
    real_types = {k: v for k, v in aws["available_node_types"].items() if k != aws["head_node_type"]}
    fake_types = {k: v for k, v in fake["available_node_types"].items() if k != fake["head_node_type"]}
    assert set(fake_types) == set(real_types) and len(fake_types) >= 5
    for name, real in real_types.items():
        node = fake_types[name]
        assert (node["min_workers"], node["max_workers"], node["labels"]) == \
            (real["min_workers"], real["max_workers"], real["labels"]), name
        assert node["resources"] == {**real["resources"], "CPU": min(real["resources"]["CPU"], fake_cluster.MAX_CPUS)}
    assert fake["available_node_types"][fake["head_node_type"]]["resources"] == \
        aws["available_node_types"][aws["head_node_type"]]["resources"]


# Instance shapes (vCPU, GiB, GPUs) from AWS's instance type pages, for the nodeSelectors we name.
SHAPES = {"m6i.4xlarge": (16, 64, 0), "g5.4xlarge": (16, 64, 1), "g5.12xlarge": (48, 192, 4)}


def quantity(text: str) -> float:
    """A Kubernetes CPU or memory quantity in cores or GiB ("250m", "14", "54Gi", "256Mi")."""
    units = {"m": 1e-3, "Gi": 1.0, "Mi": 1 / 1024}
    for unit, scale in units.items():
        if str(text).endswith(unit):
            return float(str(text)[:-len(unit)]) * scale
    return float(text)


def check_fits_its_node(group):
    """A worker group names its instance type, and its pod (every container) fits on one such node
    with room for the kubelet and system pods (at least 1 vCPU and 8 GiB left), its GPUs exactly."""
    pod = group["template"]["spec"]
    instance = pod["nodeSelector"]["node.kubernetes.io/instance-type"]
    cpus, memory, node_gpus = SHAPES[instance]
    requests = [c["resources"]["requests"] for c in pod["containers"]]
    assert sum(quantity(r["cpu"]) for r in requests) <= cpus - 1, group["groupName"]
    assert sum(quantity(r["memory"]) for r in requests) <= memory - 8, group["groupName"]
    assert sum(int(r.get("nvidia.com/gpu", 0)) for r in requests) == node_gpus, group["groupName"]


def check_ships_logs(pod):
    """The Ray container's /tmp/ray is a volume the ship-logs sidecar reads and ships to S3."""
    ray_container, *sidecars = pod["containers"]
    mounts = {m["mountPath"]: m["name"] for m in ray_container["volumeMounts"]}
    (ship,) = [c for c in sidecars if c["name"] == "ship-logs"]
    assert ship["command"][:3] == ["python", "-m", "jobs.ship_logs"] and ship["command"][4].startswith("s3://")
    assert ship["image"] == ray_container["image"] and ship["workingDir"] == "/home/ray/wand-tts"
    assert {m["mountPath"]: m["name"] for m in ship["volumeMounts"]}["/tmp/ray"] == mounts["/tmp/ray"]
    assert {v["name"] for v in pod["volumes"]} >= {mounts["/tmp/ray"]}


def check_ray_cluster_spec(spec):
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"]["mode"] == "token"  # KubeRay gives every pod RAY_AUTH_MODE and the token
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert head["template"]["spec"]["containers"][0]["image"]
    assert spec["autoscalerOptions"]["version"] == "v2"
    assert head["rayStartParams"]["num-cpus"] == "0"  # the head schedules nothing (Ray's advice)
    gpus = []
    for pod in [head["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]:
        check_ships_logs(pod)
    for group in spec["workerGroupSpecs"]:
        check_fits_its_node(group)
        assert group["groupName"] and group["minReplicas"] == 0 and group["maxReplicas"] >= 1
        assert isinstance(group["rayStartParams"], dict)
        container = group["template"]["spec"]["containers"][0]
        assert container["image"] == head["template"]["spec"]["containers"][0]["image"]
        gpus.append(int(container["resources"]["limits"].get("nvidia.com/gpu", 0)))
        # The operator's autoscaler needs requests = limits for accurate resource accounting.
        assert container["resources"]["requests"] == container["resources"]["limits"]
    assert max(gpus) >= 1


def test_kuberay_raycluster():
    manifest = load("kuberay/raycluster.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayCluster"
    assert manifest["metadata"]["name"]
    check_ray_cluster_spec(manifest["spec"])


def test_kuberay_rayjob_runs_the_distill_entry_point():
    manifest = load("kuberay/rayjob.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    spec = manifest["spec"]
    words = spec["entrypoint"].split()
    assert words[:5] == ["python", "-m", "jobs.distill", "--config", words[4]]
    assert (ROOT / words[4]).exists()
    assert "storage=s3://" in spec["entrypoint"] and "shards=s3://" in spec["entrypoint"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env["env_vars"], dict)
    assert spec["shutdownAfterJobFinishes"] is True
    check_ray_cluster_spec(spec["rayClusterSpec"])


def test_runtime_env_is_a_valid_ray_runtime_env():
    from ray.runtime_env import RuntimeEnv

    values = load("runtime_env.yaml")
    env = RuntimeEnv(**values)
    assert env["working_dir"] == "."
    assert not any(k.upper().endswith(("KEY", "SECRET", "TOKEN", "PASSWORD")) for k in values["env_vars"])


def test_one_pinned_stack_everywhere():
    """The image pins Ray, Python and CUDA (not the moving -gpu tag); the image and make install take
    every dependency from constraints.txt, which pins each one (==) at the version installed here."""
    from importlib.metadata import version as installed

    text = (CLUSTER / "Dockerfile").read_text()
    base = next(line for line in text.splitlines() if line.startswith("FROM "))
    assert base.startswith(f"FROM rayproject/ray:{ray.__version__}-py311-cu") and not base.endswith("-gpu")
    assert text.count("-c /home/ray/wand-tts/constraints.txt") == 2 and 'torch==2.13.0' in text
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()
    pins = dict(line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    for name in ("torch", "ray", "deepspeed", "transformers", "mlflow", "s3fs", "pyarrow", "pydantic", "boto3"):
        assert pins[name] == installed(name).split("+")[0], name


SCRIPT = """
import sys
sys.path.insert(0, {root!r})
import ray
from ray.cluster_utils import Cluster
from pipeline.chain import check_cluster_storage
from pipeline.config import DistillConfig

cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 1, "include_dashboard": False}})
cluster.add_node(num_cpus=1)
ray.init(address=cluster.address)
cluster.wait_for_nodes()
base = dict(experiment="x", model="cosyvoice2", model_size="tiny", precompute={{"k": 8}}, curriculum={{"window_target": 4, "window_start": 8}},
            evaluate={{"enabled": False}})
try:
    check_cluster_storage(DistillConfig(**base, corpus="s3://b/c", shards="runs/topk", storage="/data/ckpt"))
    print("NOT REFUSED")
except ValueError as err:
    print("REFUSED:", err)
check_cluster_storage(DistillConfig(**base, corpus="s3://b/c", shards="s3://b/t", storage="s3://b/r"))
print("S3 OK")
from pipeline.data.corpus_build import build_corpus
from wand.models import get_spec
try:
    build_corpus(get_spec("cosyvoice2", "tiny"), "s3://b/records", "runs/corpus/x")
    print("CORPUS NOT REFUSED")
except ValueError as err:
    print("CORPUS REFUSED:", err)
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_local_paths_are_refused_on_a_multi_node_cluster():
    import subprocess
    import sys

    # A real two-node cluster (two raylets) in a separate process: this test process may already
    # be connected to the session's one-node Ray instance.
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(root=str(ROOT))], capture_output=True, text=True,
                         timeout=240, env={**__import__("os").environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "REFUSED: x: this Ray cluster has 2 nodes" in out.stdout
    assert "shards=runs/topk" in out.stdout and "storage=/data/ckpt" in out.stdout and "corpus=" not in out.stdout
    assert "S3 OK" in out.stdout
    assert "CORPUS REFUSED: this Ray cluster has 2 nodes" in out.stdout and "--output runs/corpus/x" not in out.stdout
    assert "--output /" in out.stdout and "--input" not in out.stdout.split("CORPUS REFUSED:")[1]


def test_nothing_the_project_ships_turns_ray_auth_off():
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    shipped = [f for f in files if not f.startswith("tests/") and (ROOT / f).is_file()]
    assert len(shipped) > 20
    offenders = [f for f in shipped if "RAY_AUTH_MODE=disabled" in (ROOT / f).read_text(errors="ignore")]
    assert offenders == []


# Where a manifest's fields stop being KubeRay's own: a pod template and free-form maps.
NOT_KUBERAY = ("template", "rayStartParams", "runtimeEnvYAML", "metadata")


def kuberay_fields(value, prefix: str):
    """Every field path of a manifest's spec (list items share their list's path)."""
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{prefix}.{key}"
            yield path
            if key not in NOT_KUBERAY:
                yield from kuberay_fields(item, path)
    elif isinstance(value, list):
        for item in value:
            yield from kuberay_fields(item, prefix)


def version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


@pytest.mark.parametrize("name, kind", [("kuberay/raycluster.yaml", "raycluster"), ("kuberay/rayjob.yaml", "rayjob")])
def test_kuberay_manifests_use_only_fields_of_the_operator_they_name(name, kind):
    """Each KubeRay field is in the table of first releases (fields.yaml, derived from the released
    CRDs); the newest one decides the operator the manifest needs, and its header and the docs say
    exactly that version, so an operator that would ignore a field (and run without auth) is refused."""
    table = load("kuberay/fields.yaml")
    needed = []
    for path in sorted(set(kuberay_fields(load(name)["spec"], "spec"))):
        # A RayJob's rayClusterSpec is a RayCluster's spec.
        key = path.replace("spec.rayClusterSpec.", "spec.", 1) if path.startswith("spec.rayClusterSpec.") else path
        first = table["rayjob"].get(key) or table["raycluster"].get(key)
        assert first, f"{name}: {path} is not in cluster/kuberay/fields.yaml: add it with its first KubeRay release"
        needed.append(str(first))
    minimum = max(needed, key=version)
    assert f"operator >= {minimum}" in (CLUSTER / name).read_text(), (name, minimum)
    docs = (ROOT / "docs" / "cluster.md").read_text()
    assert f"`{name.split('/')[1]}` needs KubeRay >= {minimum}" in docs, (name, minimum)
    auth = table["raycluster"]["spec.authOptions.mode"]
    assert version(minimum) >= version(str(auth))  # never a manifest an unauthenticated operator accepts


# The label selectors the docs and aws.yaml tell users to pass (each stage to its node type).
SELECTORS = ("precompute.label_selector={wand-role: precompute}", "train.label_selector={wand-role: train}",
             "evaluate.label_selector={wand-role: precompute}")


def scheduled(types: dict, bundle: dict, count: int, selector: dict) -> dict[str, int]:
    """The node types (and how many) Ray's autoscaler v2 scheduler launches for ``count`` x ``bundle``."""
    from ray.autoscaler.v2.scheduler import ResourceDemandScheduler, SchedulingRequest
    from ray.autoscaler.v2.utils import ResourceRequestUtil
    from ray.core.generated.autoscaler_pb2 import ResourceRequestByCount
    from ray.core.generated.common_pb2 import LabelSelectorOperator

    labels = ([[(key, LabelSelectorOperator.LABEL_OPERATOR_IN, [value]) for key, value in selector.items()]]
              if selector else None)
    request = SchedulingRequest(disable_launch_config_check=True, node_type_configs=types, max_num_nodes=16,
                                resource_requests=[ResourceRequestByCount(
                                    request=ResourceRequestUtil.make(bundle, label_selectors=labels), count=count)])
    reply = ResourceDemandScheduler(None).schedule(request)
    assert not reply.infeasible_resource_requests, (bundle, selector)
    return {launch.instance_type: launch.count for launch in reply.to_launch}


def test_each_stage_lands_on_the_node_type_meant_for_it():
    """Ray's own autoscaler v2 scheduler, fed cluster/aws.yaml's node types and the paper config's
    demands (pipeline.preflight.demands: pipeline.resources, what the stages ask Ray for) with the documented label
    selectors: the teacher actors and the evals on the spot A10G type, a training stage on the
    on-demand 4-GPU type, nothing on the head. Without the selectors Ray's utilisation score would
    put the precompute on the on-demand training type."""
    import argparse

    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig

    from pipeline.cli import load_experiments
    from pipeline.config import DistillConfig
    from pipeline.preflight import demands

    for text in ((CLUSTER / "aws.yaml").read_text(), (ROOT / "docs" / "cluster.md").read_text()):
        assert all(f"--set '{selector}'" in text for selector in SELECTORS)
    argv = ["--config", str(ROOT / "jobs" / "configs" / "paper.yaml"), "--only", "cosyvoice2"]
    configs, _ = load_experiments(DistillConfig, argparse.ArgumentParser(),
                                  argv + [arg for selector in SELECTORS for arg in ("--set", selector)])
    types = AutoscalingConfig(load("aws.yaml"), skip_content_hash=True).get_node_type_configs()
    assert types[load("aws.yaml")["head_node_type"]].resources == {"CPU": 0, "GPU": 0}
    wanted = demands(configs[0], gpus_in_cluster=1)
    placed = {step: scheduled(types, r.bundle, r.count, r.labels) for step, r in wanted.items()}
    assert placed == {"precompute": {"gpu.a10g.1x.spot": 4}, "train": {"gpu.a10g.4x.ondemand": 1},
                      "evaluate": {"gpu.a10g.1x.spot": 1}}, placed
    assert scheduled(types, wanted["precompute"].bundle, wanted["precompute"].count, {}) == {"gpu.a10g.4x.ondemand": 1}  # why the selectors are there


def test_preflight_refuses_each_steps_request_the_cluster_cannot_hold(ray_local):
    """pipeline.resources is what the steps ask Ray for; preflight checks the same requests on the
    running cluster (2 CPUs, no GPU here) and names the field behind each."""
    import argparse

    from pipeline.cli import load_experiments
    from pipeline.config import DistillConfig
    from pipeline.preflight import check_resources

    def problems(*settings):
        argv = ["--config", str(ROOT / "jobs" / "configs" / "tiny.yaml"), "--only", "sparktts"]
        configs, _ = load_experiments(DistillConfig, argparse.ArgumentParser(),
                                      argv + [a for s in settings for a in ("--set", s)])
        return check_resources(configs[0])

    assert problems() == []
    (line,) = problems("train.cpus_per_worker=1.5")  # two workers: 3 CPUs, more than the cluster has
    assert line.startswith("train.cpus_per_worker x train.num_workers: asks for 3 CPU, but the whole cluster "
                           "of this Ray cluster has 2"), line
    gpu, evals = problems("train.use_gpu=true", "train.attention=sdpa")  # the evals follow (num_gpus: auto)
    assert gpu.startswith("train.num_workers (one GPU each, train.use_gpu): asks for 2 GPU"), gpu
    assert evals.startswith("evaluate.num_gpus: asks for 1 GPU, but any node"), evals
    (line,) = problems("evaluate.num_cpus=3")
    assert line.startswith("evaluate.num_cpus: asks for 3 CPU, but any node"), line
    (line,) = problems("precompute.num_gpus_per_actor=1")
    assert line.startswith("precompute.num_gpus_per_actor: asks for 1 GPU, but any node"), line

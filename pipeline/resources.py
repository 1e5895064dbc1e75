"""What each step asks Ray for, defined once: the steps build their Ray requests from these
(the precompute's actor pool, the training workers, the evals' task) and the preflight checks and
the node-type scheduling test read the same ones, so what is checked is what runs."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RayRequest:
    bundle: dict[str, float]           # one actor's / worker's / task's resources (zero entries left out)
    count: int                         # how many at once
    labels: dict[str, str] = field(default_factory=dict)  # the label selector; empty: any node

    @property
    def cpus(self) -> float:
        return self.bundle.get("CPU", 0.0)

    @property
    def gpus(self) -> float:
        return self.bundle.get("GPU", 0.0)

    def selector(self) -> dict:
        """``label_selector=`` for Ray's options when there is one (older call sites reject ``{}``)."""
        return {"label_selector": dict(self.labels)} if self.labels else {}


def _request(cpus: float, gpus: float, count: int, labels) -> RayRequest:
    return RayRequest({k: v for k, v in {"CPU": cpus, "GPU": gpus}.items() if v}, count, dict(labels))


def precompute(config) -> RayRequest:
    """The teacher actors of ``PrecomputeConfig``: ``num_actors`` of CPUs and GPUs per actor."""
    return _request(config.num_cpus_per_actor, config.num_gpus_per_actor, config.num_actors, config.label_selector)


def train(config) -> RayRequest:
    """The training workers of ``TrainConfig``: one GPU each with ``use_gpu``."""
    return _request(config.cpus_per_worker, 1.0 if config.use_gpu else 0.0, config.num_workers, config.label_selector)


def evaluate(config, trains_on_gpu: bool, cluster_gpus: float) -> RayRequest:
    """The evals' one task of ``EvalConfig`` (``num_gpus: auto`` resolved against the run)."""
    return _request(config.num_cpus, config.resolved_gpus(trains_on_gpu, cluster_gpus), 1, config.label_selector)

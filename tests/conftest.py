"""Shared fixtures: tiny random-weight models of the real backbone classes."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

VOCAB = 96


def pytest_configure(config):
    """Every Ray cluster the tests start (in-process ``ray.init``, ``ray start`` heads, jobs' own local
    clusters in subprocesses) uses token auth with one session token, and binds to 127.0.0.1 only.
    Set before any test module imports ray: Ray reads both at import and at start."""
    import os
    import tempfile
    from pathlib import Path

    from pipeline.services import LOOPBACK_ENV, ray_auth_env, write_token

    # One ninja for every DeepSpeed JIT build of its shm comm op: the venv's (1.13) and the system's
    # (1.11) keep incompatible build logs, so each switch between a test's subprocess (the venv's bin
    # first, as an activated venv has it) and this process's PATH rebuilt the op: 40-70 s each.
    import sys

    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    folder = Path(tempfile.mkdtemp(prefix="wand-test-ray-"))
    config._wand_ray_token = write_token(folder / "ray_auth_token")
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ.update({**ray_auth_env(config._wand_ray_token), **LOOPBACK_ENV})


def pytest_unconfigure(config):
    import shutil

    token = getattr(config, "_wand_ray_token", None)
    if token is not None:
        shutil.rmtree(token.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_token(pytestconfig):
    """The session's Ray auth token file (mode 0600); its path is in RAY_AUTH_TOKEN_PATH."""
    return pytestconfig._wand_ray_token


def tiny_model(family: str, attn: str = "sdpa", seed: int = 0, hidden: int = 32) -> torch.nn.Module:
    """A tiny fp32 model of the given backbone class, eval mode, deterministic weights. 4 heads of
    ``hidden / 4``: compiled FlexAttention on CUDA needs a head size of at least 16 (hidden=64)."""
    torch.manual_seed(seed)
    if family == "qwen2":
        config = Qwen2Config(
            vocab_size=VOCAB, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        )
        model = Qwen2ForCausalLM(config)
    elif family == "llama":
        config = LlamaConfig(
            vocab_size=VOCAB, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=1024,
        )
        model = LlamaForCausalLM(config)
    elif family == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=2, n_head=4, n_positions=1024, bos_token_id=0, eos_token_id=1)
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(family)
    model.set_attn_implementation(attn)
    return model.eval()


FAMILIES = ["qwen2", "llama", "gpt2"]


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1, with the environment pointing boto/s3fs at it."""
    import os

    from s3_server import MotoServer

    with MotoServer() as server:
        saved = {k: os.environ.get(k) for k in server.env()}
        os.environ.update(server.env())
        try:
            yield server
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A real local Ray instance with 2 logical CPUs (started after the S3 fixture so its workers
    inherit the S3 endpoint and the fake credentials from the environment)."""
    import os

    import ray

    from pathlib import Path

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # DeepSpeed on CPU; its shared-memory comm op is JIT-built once into the repo's ignored cache.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"))
    # address="local": always a fresh in-process cluster, never one that `ray start` left on this
    # machine (the job-submission tests start and stop their own).
    from pipeline.services import own_state_api

    # own_state_api: else every trainer.fit() ends 10-12 s late once a test's `ray start` head has
    # left its pointer behind (no dashboard here: the state API then refuses at once).
    with own_state_api() as own:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 **own)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1 and a free port (sqlite store, temp artifact root)."""
    from pipeline.services import MLflowServer

    with MLflowServer(tmp_path_factory.mktemp("mlflow")) as server:
        yield server

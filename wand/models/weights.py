"""Finding and reading released weights: local path, ``s3://`` URI, or a Hugging Face id.

Never unpickles arbitrary objects: ``.pt``/``.pth``/``.bin`` go through
``torch.load(..., weights_only=True)``; safetensors is preferred wherever a model ships it.
Credentials for S3 come only from the environment or the instance role (s3fs/botocore's own
chain); an S3-compatible endpoint is taken from ``s3_endpoint(...)`` (the pipeline's configured one), else
``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: torch is imported by the functions that read or load weights
    import torch

__all__ = ["resolve_source", "read_state_dict", "load_checked", "fingerprint", "WeightsNotFound", "WeightsRefused"]


class WeightsNotFound(ValueError):
    """The weights could not be found or downloaded; the message says how to point at a copy."""


def _cache_root() -> Path:
    return Path(os.environ.get("WAND_CACHE_DIR", Path.home() / ".cache" / "wand-tts"))


def _how_to(spec_name: str, hf_id: str | None) -> str:
    hint = (
        f"download it where there is network (`huggingface-cli download {hf_id} --local-dir DIR`) and pass "
        "source=DIR (a local directory), or copy it to S3 and pass source='s3://bucket/prefix'"
        if hf_id
        else "pass source= a local directory or an s3:// URI holding the checkpoint"
    )
    return f"{spec_name}: {hint}"


_S3_ENDPOINT: contextvars.ContextVar[str | None] = contextvars.ContextVar("wand_s3_endpoint", default=None)


class WeightsRefused(ValueError):
    """A weights file that cannot be read without executing code from it."""


@contextlib.contextmanager
def s3_endpoint(endpoint: str | None):
    """Within this block, ``s3://`` weights are read from ``endpoint`` (an S3-compatible server such
    as MinIO; the pipeline's configured ``s3_endpoint``) instead of ``AWS_ENDPOINT_URL``."""
    token = _S3_ENDPOINT.set(endpoint)
    try:
        yield
    finally:
        _S3_ENDPOINT.reset(token)


def resolve_source(source: str, spec_name: str, hf_id: str | None = None) -> Path:
    """Return a local path (file or directory) for ``source``."""
    if source.startswith("s3://"):
        return _download_s3(source, spec_name, hf_id)
    path = Path(source).expanduser()
    if path.exists():
        return path
    if source.startswith(("/", ".", "~")) or os.sep in source.rstrip("/").split("/", 1)[0]:
        raise WeightsNotFound(f"{spec_name}: no such file or directory: {source}. " + _how_to(spec_name, hf_id))
    return _download_hf(source, spec_name)


def _download_s3(uri: str, spec_name: str, hf_id: str | None) -> Path:
    try:
        import s3fs
    except ImportError:
        raise WeightsNotFound(f"{spec_name}: loading {uri} needs s3fs, which comes with the pipeline: "
                              "pip install 'wand-tts[pipeline]' (or pip install s3fs)") from None

    endpoint = _S3_ENDPOINT.get() or os.environ.get("AWS_ENDPOINT_URL")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint} if endpoint else None)
    key = uri[len("s3://"):].rstrip("/")
    target = _cache_root() / "s3" / key
    try:
        if fs.isdir(key):
            fs.get(key + "/", str(target) + "/", recursive=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get(key, str(target))
    except FileNotFoundError as err:
        raise WeightsNotFound(f"{spec_name}: {uri} does not exist. " + _how_to(spec_name, hf_id)) from err
    return target


def _download_hf(repo_id: str, spec_name: str) -> Path:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise WeightsNotFound(
            f"{spec_name}: '{repo_id}' is not a local path (no such file or directory under {os.getcwd()}), "
            "and as a Hugging Face id it cannot be fetched: HF_HUB_OFFLINE is set (no network). "
            + _how_to(spec_name, repo_id)
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id))
    except Exception as err:  # network errors come in many types; the message says what to do
        raise WeightsNotFound(
            f"{spec_name}: '{repo_id}' is not a local path (no such file or directory under {os.getcwd()}), and "
            f"could not be downloaded from the Hugging Face Hub ({type(err).__name__}: {str(err)[:300]}). "
            + _how_to(spec_name, repo_id)
        ) from err


def read_state_dict(path: Path, names: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], Path]:
    """Read a state dict from ``path`` (a file, or a directory holding one of ``names``)."""
    if path.is_dir():
        for name in names:
            if (path / name).exists():
                path = path / name
                break
        else:
            raise WeightsNotFound(f"{path} holds none of {', '.join(names)}")
    if path.suffix == ".safetensors":
        return read_safetensors(path), path
    if path.suffix in (".pt", ".pth", ".bin"):
        import torch

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:  # raised before any of the file's own code runs
            raise WeightsRefused(
                f"{path}: refused: it pickles objects other than tensors, and loading them would run code from "
                "the file (weights are read with torch.load(weights_only=True)). Use the model's released "
                f"weights, or save a plain state dict (ideally safetensors) from a trusted copy. ({str(err)[:300]})"
            ) from err
        except (RuntimeError, EOFError, OSError, ValueError) as err:  # truncated, not a torch file, unreadable
            raise WeightsRefused(f"{path}: cannot be read as a torch weights file ({type(err).__name__}: "
                                 f"{str(err)[:200]})") from err
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]  # some training checkpoints nest the weights
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise WeightsRefused(f"{path}: holds no state dict of tensors")
        return state, path
    raise WeightsNotFound(f"{path}: unknown weights format (expected .safetensors, .pt, .pth or .bin)")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a truncated or foreign file is refused naming its path."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise WeightsRefused(f"{path}: cannot be read as safetensors ({str(err)[:200]})") from err


def require_finite(tensors: dict[str, torch.Tensor], path, name: str) -> None:
    """Weights with NaN or inf would train and decode garbage without an error: refused, named."""
    import torch

    bad = [key for key, value in tensors.items() if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise WeightsRefused(f"{name}: {path}: {len(bad)} tensor(s) hold NaN or inf values (e.g. {bad[:3]}); "
                             "refusing to load corrupt weights")


def load_tied(model: torch.nn.Module, state: dict, path, name: str) -> None:
    """Load a state dict in which tied weights were stored once (as ``save_file`` keeps them);
    anything else missing, unexpected or non-finite is an error naming ``path``."""
    require_finite(state, path, name)
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape)]
    if unexpected or shapes:
        raise ValueError(f"{name}: {path} does not match the model: unexpected {unexpected[:3]}, "
                         f"shape mismatch {sorted(shapes)[:3]}")
    missing, _ = model.load_state_dict(state, strict=False)
    stored = {t.data_ptr() for key, t in model.state_dict().items() if key in state}
    real_missing = [m for m in missing if own[m].data_ptr() not in stored]
    if real_missing:
        raise ValueError(f"{name}: {path} lacks {len(real_missing)} of the model's tensors (e.g. {real_missing[:3]})")


def load_checked(model: torch.nn.Module, state: dict, path, name: str, ignore_prefixes: tuple[str, ...] = ()) -> list[str]:
    """``load_state_dict(strict=True)`` with an error that lists what differs; returns ignored keys."""
    ignored = [k for k in state if k.startswith(ignore_prefixes)] if ignore_prefixes else []
    state = {k: v for k, v in state.items() if k not in set(ignored)}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"shape mismatch {len(shapes)} (e.g. {shapes[:3]})")
        raise ValueError(f"{name}: {path} does not match this preset's architecture: " + "; ".join(parts))
    require_finite(state, path, name)
    model.load_state_dict(state, strict=True)
    return ignored


def fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over names and float32 values: equal iff the weights are equal (any dtype, any device)."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(state_dict.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- teacher side
def teacher_weights(spec, source: str | None, seed: int, endpoint: str | None) -> torch.nn.Module:
    """The teacher of an experiment, the one place it is loaded (the precompute's actors, a student's
    first stage, the evals): released weights from ``source``, else seeded random weights (test sizes)."""
    if source:
        with s3_endpoint(endpoint):
            return spec.load(source)
    import torch

    torch.manual_seed(seed)
    return spec.build()

"""Per-step decode latency and KV-cache bytes, full attention vs WAND (shared by benchmarks and evals)."""

from __future__ import annotations

import contextlib
import inspect
import statistics
import time
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache

from .cache import WandCache
from .machine import cpu_device, cpu_model  # noqa: F401  (re-exported)
from .generation import cache_kwarg_name
from .patch import enable_wand, is_enabled, original_forward

__all__ = ["DecodeProfile", "profile_decode", "cache_nbytes", "bucket_stats", "timing_conditions", "cpu_model",
           "cpu_device"]


def cache_nbytes(cache) -> int:
    """Bytes of keys and values held by a WandCache or a transformers DynamicCache."""
    if isinstance(cache, WandCache):
        return cache.nbytes()
    total = 0
    for layer in getattr(cache, "layers", []):
        if getattr(layer, "keys", None) is not None:
            total += layer.keys.numel() * layer.keys.element_size()
            total += layer.values.numel() * layer.values.element_size()
    return total


@dataclass
class DecodeProfile:
    window: int | None
    prefix_length: int
    attention: str = ""  # the attention kernels it ran under (timing_conditions)
    step_seconds: list[float] = field(default_factory=list)  # step s = generating token s+1
    cache_bytes: dict[int, int] = field(default_factory=dict)  # step -> bytes after it

    def latency_at(self, step: int, half_width: int = 25) -> float:
        """Median step time over [step - half_width, step + half_width] (robust to timer noise)."""
        lo, hi = max(0, step - half_width), min(len(self.step_seconds), step + half_width + 1)
        return statistics.median(self.step_seconds[lo:hi])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


FAIR_SDPA_BACKENDS = "flash + memory-efficient (cuDNN and math excluded)"


@contextlib.contextmanager
def timing_conditions(device: torch.device):
    """The conditions every timed decode runs under, full attention and WAND alike.

    CUDA: SDPA pinned to the flash and memory-efficient kernels. Left to choose, PyTorch picked
    cuDNN attention on an H100, which spent ~5.7 ms of CPU per call whenever the KV length changed
    (a new plan per length): that times cuDNN's planner, not full attention. Full attention (causal,
    no mask) runs flash; WAND's dense mask cannot, and runs memory-efficient attention.
    CPU: denormal floats flushed to zero. Random-weight fp32 models drift into denormals, and a tiny
    WAND step then took 200-320 ms instead of 3.4 ms: that times the FPU's slow path, not the model.
    """
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            yield FAIR_SDPA_BACKENDS
        return
    flushed = torch.set_flush_denormal(True)
    try:
        yield "sdpa (CPU), denormals flushed" if flushed else "sdpa (CPU)"
    finally:
        if flushed:
            torch.set_flush_denormal(False)


@torch.no_grad()
def profile_decode(
    model: torch.nn.Module,
    prefix_length: int,
    window: int | None,
    steps: int,
    record_bytes_at: list[int] | tuple[int, ...] = (),
    seed: int = 0,
    vocab_limit: int | None = None,
    prompt: torch.Tensor | None = None,
    prefill_kwargs: dict | None = None,
    token_ids: torch.Tensor | None = None,
) -> DecodeProfile:
    """Prefill a prefix, then decode ``steps`` tokens one at a time, timing every step.

    The prefix is ``prompt`` [1, prefix_length] when given (a real row's conditioning; with
    ``prefill_kwargs`` for the first forward, e.g. IndexTTS's latents), else random ids. Tokens are
    fed back greedily, restricted to ``token_ids`` when given (e.g. the speech codes).
    ``window=None`` is the full-attention baseline with transformers' DynamicCache.
    """
    device = next(model.parameters()).device
    if window is not None and not is_enabled(model):
        enable_wand(model, window)
    if prompt is None:
        vocab = vocab_limit or model.config.vocab_size
        gen = torch.Generator().manual_seed(seed)
        prompt = torch.randint(0, vocab, (1, prefix_length), generator=gen)
    prompt = prompt.to(device)
    prefix_length = prompt.shape[1]
    prefix = torch.tensor([prefix_length], device=device)
    if window is None:
        # The baseline is the model's own forward (no WAND wrapper, no custom mask), so it gets
        # transformers' fastest full-attention path; except for models whose positions depend on
        # the prefix (IndexTTS numbers text and mel separately): they take the wrapper's full mask.
        cache = DynamicCache()
        forward = original_forward(model)
        kw = {cache_kwarg_name(model): cache}
        if "prefix_lengths" in inspect.signature(forward).parameters:
            if not is_enabled(model):
                enable_wand(model, None)
            forward = model.forward
            kw.update(prefix_lengths=prefix, window=None)
    else:
        cache = WandCache(prefix, window)
        forward = model.forward
        kw = {cache_kwarg_name(model): cache, "prefix_lengths": prefix, "window": window}
    ids = None if token_ids is None else token_ids.to(device)

    def pick(logits: torch.Tensor) -> torch.Tensor:
        if ids is None:
            return logits[:, -1:].argmax(-1) % (vocab_limit or logits.shape[-1])
        return ids[logits[:, -1:, ids].argmax(-1)]

    with timing_conditions(device) as attention:
        out = forward(input_ids=prompt, use_cache=True, **kw, **(prefill_kwargs or {}))
        token = pick(out.logits)
        profile = DecodeProfile(window, prefix_length, attention)
        wanted = set(record_bytes_at)
        for step in range(steps):
            _sync(device)
            start = time.perf_counter()
            out = forward(input_ids=token, use_cache=True, **kw)
            token = pick(out.logits)
            _sync(device)
            profile.step_seconds.append(time.perf_counter() - start)
            if step + 1 in wanted:
                profile.cache_bytes[step + 1] = cache_nbytes(cache)
    return profile


def bucket_stats(step_seconds: list[float], bucket: int) -> list[tuple[int, float, float]]:
    """(bucket start, p50, p90) of step times per bucket of ``bucket`` steps."""
    rows = []
    for start in range(0, len(step_seconds), bucket):
        chunk = sorted(step_seconds[start : start + bucket])
        if chunk:
            rows.append((start, chunk[len(chunk) // 2], chunk[min(len(chunk) - 1, int(0.9 * len(chunk)))]))
    return rows


def device_name(device: torch.device) -> str:
    """What a timing ran on, for tables and logs: the GPU's name, or the CPU with its cores and threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_device(torch.get_num_threads(), cores=True)


def launches_per_step(step, *args, device: torch.device) -> dict:
    """What one call of ``step(*args)`` launches, from the torch profiler: ``aten_ops`` (operators
    dispatched on the host; 0 for a step replayed from a CUDA graph), and on CUDA ``kernels`` (device
    kernels, graph-replayed ones included where the profiler sees them) and ``graph_launches``
    (``cudaGraphLaunch`` calls). Run the step once before, so compilation and capture are not counted."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step(*args)
        _sync(device)
    events = prof.events()
    counts = {"aten_ops": sum(1 for e in events if e.name.startswith("aten::") and e.cpu_parent is None)}
    if device.type == "cuda":
        counts["kernels"] = sum(1 for e in events if e.device_type == DeviceType.CUDA)
        counts["graph_launches"] = sum(1 for e in events if e.name == "cudaGraphLaunch")
    return counts


# Operators whose result needs a device value on the host (a scalar read, or an output whose size
# depends on the data): on CUDA each waits for the device, and none may run inside a CUDA graph
# capture. A name without an overload counts every overload of it.
HOST_READ_OPS = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_consecutive",
                           "unique_dim", "equal", "repeat_interleave.Tensor"})


def host_reads(step, *args) -> dict[str, int]:
    """How many times one call of ``step(*args)`` (under no_grad) ran each operator of
    ``HOST_READ_OPS``, and each indexing by a boolean mask. Found by dispatch, so it works on the CPU
    too: CI checks there that a step a CUDA graph will capture reads nothing back. Not seen this way:
    an explicit ``.cpu()`` of a CPU tensor, which dispatches nothing on the CPU (on CUDA
    ``torch.cuda.set_sync_debug_mode`` sees it)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    found: dict[str, int] = {}

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            base = func._schema.name.split("::", 1)[-1]
            name = base if func._overloadname == "default" else f"{base}.{func._overloadname}"
            if base in ("index", "index_put", "index_put_", "_index_put_impl_") and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ())):
                name = f"{name} (boolean mask)"  # its nonzero runs below the dispatcher
            elif not (base in HOST_READ_OPS or name in HOST_READ_OPS):
                return func(*args, **(kwargs or {}))
            found[name] = found.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Reads():
        step(*args)
    return found


def weight_read_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step must read: every parameter once (tied ones once), except
    embedding tables that only look rows up (an ``nn.Embedding`` whose weight no ``nn.Linear`` also
    uses as its head). Divided by the device's bandwidth, the step's weight-read floor."""
    heads = {m.weight.data_ptr() for m in model.modules() if isinstance(m, torch.nn.Linear)}
    counted: set[int] = set()
    total = 0
    for module in model.modules():
        for param in module.parameters(recurse=False):
            key = param.data_ptr()
            if key in counted or (isinstance(module, torch.nn.Embedding) and key not in heads):
                continue
            counted.add(key)
            total += param.numel() * param.element_size()
    return total


def copy_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 5) -> float:
    """Bytes per second one device-to-device copy moves (read + write; median of ``repeats``): the
    memory bandwidth a step can reach, measured rather than taken from a data sheet."""
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 26)
    source = torch.ones(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        target.copy_(source)
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times[1:])

"""Fused projections and norms for decoding: a layer's Q, K and V projections as one matmul, gate and
up as one, each RMSNorm through torch's fused ``rms_norm``.

A decode step at small batch is bound by its kernels, not its arithmetic: each projection is a thin
matrix-vector product reading its weight once. Llama- and Qwen2-family layers (CosyVoice 2, SparkTTS,
Llasa, Orpheus) call ``q_proj``, ``k_proj`` and ``v_proj`` on the same input, then ``gate_proj`` and
``up_proj`` on the same input: five matmuls (and three bias adds) where two would do. IndexTTS's GPT-2
layers are fused already (``c_attn``).

:func:`fuse_projections` concatenates each group's weights (and biases) into one tensor and makes the
original ``nn.Linear`` parameters views into it, so the model keeps its modules, parameter names,
``state_dict`` and memory; an in-place update of a member's weight (``load_state_dict``, an optimizer
step) is an update of the fused tensor. Under ``torch.no_grad`` the first member called on an input
runs the fused matmul and every member returns its slice of it; the others reuse it while the input is
the same tensor, unchanged. With gradients enabled each member runs its own matmul; a member whose
parameters are replaced (``model.to(...)`` to another device or dtype, ``load_state_dict(...,
assign=True)``) becomes a plain ``nn.Linear`` again. Either way the results are the unfused ones,
only the speed differs.

:func:`fuse_norms` runs Llama / Qwen2 RMSNorms through ``torch.rms_norm`` (one kernel on CUDA for
the five of the normalisation), with the original's casts around it.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["fuse_projections", "fuse_norms", "FUSED_GROUPS", "FUSED_NORMS", "is_fused"]

# Sibling projections applied to one input in Llama / Qwen2 layers (transformers' module names).
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# RMSNorm classes whose forward is exactly "normalise in fp32, cast back, times weight" (not Gemma's
# 1 + weight): what fuse_norms may replace. Named, not guessed from a class name.
FUSED_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm")


class _Group:
    """One fused weight (and bias) and the last input's fused output, shared by the group's members."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, bounds: list[tuple[int, int]]):
        self.weight = weight
        self.bias = bias
        self.bounds = bounds
        self.memo: tuple | None = None  # (input, its version, fused output, members still to read it)

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        tracing = torch.compiler.is_compiling()  # dynamo traces identity, not tensor versions
        version = None if tracing else x._version
        memo = self.memo
        if memo is None or memo[0] is not x or memo[1] != version:
            memo = (x, version, F.linear(x, self.weight, self.bias), len(self.bounds))
        start, end = self.bounds[index]
        out, left = memo[2], memo[3] - 1
        # Dropped once every member has read it: no input or output is held between steps.
        self.memo = None if left == 0 else (memo[0], memo[1], out, left)
        return out[..., start:end]


class _FusedLinear(nn.Linear):
    """An ``nn.Linear`` whose weight is a view into its group's fused weight (class swapped in place)."""

    _wand_group: _Group
    _wand_index: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or not self._aliased():
            return F.linear(x, self.weight, self.bias)
        return self._wand_group.output(x, self._wand_index)

    # A move (to / cuda / half ...) or load_state_dict(assign=True) replaces the parameters: then the
    # member is a plain Linear again, so no path (eager, compiled or captured) can use a stale fused weight.
    def _apply(self, fn, recurse: bool = True):
        result = super()._apply(fn, recurse)
        self._unfuse_if_replaced()
        return result

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._unfuse_if_replaced()

    def __deepcopy__(self, memo):
        """A plain ``nn.Linear`` copy: deepcopy clones each parameter on its own, so the copies could
        not be views of one fused tensor (fuse the copied model again)."""
        clone = nn.Linear.__new__(nn.Linear)
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            if not key.startswith("_wand_"):
                clone.__dict__[key] = copy.deepcopy(value, memo)
        return clone

    def _unfuse_if_replaced(self) -> None:
        if not self._aliased():
            self.__class__ = nn.Linear
            del self._wand_group, self._wand_index

    def _aliased(self) -> bool:
        """Whether the weight (and bias) are still this member's rows of the group's fused tensors."""
        if torch.compiler.is_compiling():  # checked on the host when the step runs eagerly or is captured
            return True
        group = self._wand_group
        start = group.bounds[self._wand_index][0]
        return _rows_of(self.weight, group.weight, start * self.in_features) and (
            self.bias is None or _rows_of(self.bias, group.bias, start))


def _rows_of(part: torch.Tensor, whole: torch.Tensor | None, offset: int) -> bool:
    return (whole is not None and part.device == whole.device and part.dtype == whole.dtype
            and part.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()
            and part.storage_offset() == whole.storage_offset() + offset)


class _FusedRMSNorm(nn.Module):
    """A Llama / Qwen2 RMSNorm (class swapped in place) through ``torch.rms_norm``: on CUDA one fused
    kernel for the fp32 normalisation where transformers' forward launches five (pow, mean, add,
    rsqrt, mul). The casts and the weight product are the original's, in its order, so
    the result is the same: bit for bit on the CPU (where torch composes the same ops; tested)."""

    weight: torch.Tensor
    variance_epsilon: float

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        normed = torch.rms_norm(hidden_states.to(torch.float32), self.weight.shape, None, self.variance_epsilon)
        return self.weight * normed.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, fused"


def fuse_norms(model: nn.Module) -> int:
    """Swap every RMSNorm of a class in ``FUSED_NORMS`` for the ``torch.rms_norm`` form (in place; the
    module keeps its weight, name and ``state_dict``); returns how many were swapped."""
    swapped = 0
    for module in model.modules():
        if type(module).__name__ in FUSED_NORMS and hasattr(module, "variance_epsilon"):
            module.__class__ = _FusedRMSNorm
            swapped += 1
    return swapped


def is_fused(model: nn.Module) -> bool:
    """Whether ``fuse_projections`` or ``fuse_norms`` has changed any module of ``model``."""
    return any(isinstance(module, (_FusedLinear, _FusedRMSNorm)) for module in model.modules())


def fuse_projections(model: nn.Module) -> int:
    """Fuse every group of sibling projections in ``FUSED_GROUPS`` (in place); returns how many groups
    were fused (0 for a model without them, or one fused already). Members must be plain ``nn.Linear``
    on one input size, device and dtype, all with or all without a bias; a group that is not is left
    as it is (a LoRA-wrapped or quantised projection, for instance)."""
    fused = 0
    for module in model.modules():
        for names in FUSED_GROUPS:
            members = [getattr(module, name, None) for name in names]
            if not all(type(member) is nn.Linear for member in members):
                continue
            first = members[0]
            same = all(m.in_features == first.in_features and m.weight.device == first.weight.device
                       and m.weight.dtype == first.weight.dtype and (m.bias is None) == (first.bias is None)
                       for m in members)
            if not same:
                continue
            _fuse(members)
            fused += 1
    return fused


def _fuse(members: list[nn.Linear]) -> None:
    with torch.no_grad():
        weight = torch.cat([m.weight for m in members])
        bias = None if members[0].bias is None else torch.cat([m.bias for m in members])
    bounds, start = [], 0
    for m in members:
        bounds.append((start, start + m.out_features))
        start += m.out_features
    group = _Group(weight, bias, bounds)
    for index, (m, (lo, hi)) in enumerate(zip(members, bounds)):
        # Parameters made from slices share the fused tensor's storage: no copy is kept.
        m.weight = nn.Parameter(weight[lo:hi], requires_grad=m.weight.requires_grad)
        if bias is not None:
            m.bias = nn.Parameter(bias[lo:hi], requires_grad=m.bias.requires_grad)
        m.__class__ = _FusedLinear
        m._wand_group = group
        m._wand_index = index

"""Distill steps under DeepSpeed ZeRO against the same steps in plain torch, on one device, without Ray.

    .venv/bin/python -m benchmarks.deepspeed_step                  # CPU: fp32, gloo (make test runs it)
    .venv/bin/python -m benchmarks.deepspeed_step --device cuda    # GPU: ZeRO-2, bf16, nccl (make gpu-check)

The training worker's step (``pipeline.train.worker``) on one process: the worker's DeepSpeed
configuration (``pipeline.train.ds_config``: ZeRO --zero-stage, torch AdamW, no op builds, bf16 on
CUDA), ``wand.distill.distill_loss`` on synthetic rows with the teacher's top-k, --steps steps.
The plain side runs the same steps with torch AdamW and the same gradient clipping; on CUDA it keeps
fp32 weights under bf16 autocast, the closest plain form of DeepSpeed's bf16 weights with fp32
master weights. Each step's loss must agree within --tolerance (relative; default 1e-5 in fp32,
1e-2 in bf16), and the loss must move by more than twice the largest difference (the comparison
sees the updates), else the exit status is 1. --dtype bfloat16 runs the bf16 comparison on CPU too.
Writes benchmarks/results/deepspeed_step_<device>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
from pathlib import Path

import torch

import wand
from wand.batch import collate
from wand.distill import SparseTeacher, distill_loss
from wand.models import get_spec
from wand.profiling import device_name
from wand.topk import sparse_teacher_targets

from pipeline.services import free_port
from pipeline.synthetic.law import synthetic_rows
from pipeline.train.ds_config import deepspeed_config

ROOT = Path(__file__).resolve().parents[1]


def teacher_targets(spec, teacher, batch, k: int) -> SparseTeacher:
    """The full-attention teacher's top-k at the batch's target positions (what the precompute shards)."""
    with torch.no_grad():
        hidden, head = spec.hidden_and_head(teacher, teacher, **batch.model_inputs(), window=None, tau=None)
        logits = head(hidden[batch.batch_index, batch.positions]).float()
    return SparseTeacher(*sparse_teacher_targets(logits, spec.target_ids().to(logits.device), k))


def run_steps(spec, model, step_fn, batches, window: int, autocast) -> list[float]:
    losses = []
    for batch, teacher in batches:
        with autocast():
            out = distill_loss(spec, model, batch, window, None, teacher, forward=step_fn.forward)
        step_fn.update(out.loss)
        losses.append(float(out.loss.detach()))
    return losses


class Plain:
    def __init__(self, model, lr: float, clipping: float):
        self.model, self.clipping, self.forward = model, clipping, model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr)

    def update(self, loss) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clipping)
        self.optimizer.step()


class DeepSpeed:
    def __init__(self, model, lr: float, clipping: float, batch_size: int, zero_stage: int, bf16: bool):
        import deepspeed

        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        config = deepspeed_config(batch_size, zero_stage, clipping, bf16)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.forward = self.engine

    def update(self, loss) -> None:
        self.engine.backward(loss)
        self.engine.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="cosyvoice2", help="model preset (wand.models)")
    parser.add_argument("--size", default="tiny", help="preset size (tiny: the test models; real: the released shape)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--zero-stage", type=int, choices=(1, 2, 3), default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--k", type=int, default=16, help="teacher top-k")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--tolerance", type=float, default=None, help="relative; default 1e-5 fp32, 1e-2 bf16")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if args.batch < 1 or args.steps < 2:
        parser.error("--batch must be >= 1 and --steps >= 2 (the second step shows the first update)")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    tolerance = args.tolerance or (1e-2 if args.dtype == "bfloat16" else 1e-5)
    # One process, one rank, on loopback: DeepSpeed needs a process group even for one device.
    os.environ.update(DS_ACCELERATOR="cuda" if cuda else "cpu", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if not cuda:  # DeepSpeed's CPU comm op is JIT-built once (about a minute): keep it in the repo's cache
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    try:
        compare(args, device, tolerance)
    finally:
        torch.distributed.destroy_process_group()  # else the exit waits on the group's threads


def compare(args, device: torch.device, tolerance: float) -> None:
    import deepspeed

    bf16 = args.dtype == "bfloat16"
    spec = get_spec(args.model, args.size)
    torch.manual_seed(0)
    teacher = spec.build().to(device).eval()
    rows = synthetic_rows(spec, args.batch * args.steps, seed=1)
    batches = []
    for i in range(args.steps):
        batch = collate(spec, rows[i * args.batch:(i + 1) * args.batch], device)
        batches.append((batch, teacher_targets(spec, teacher, batch, args.k)))
    plain_model = wand.enable_wand(copy.deepcopy(teacher).train(), args.window)
    ds_model = wand.enable_wand(copy.deepcopy(teacher).train(), args.window)
    clipping = 1.0
    plain_autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    plain = run_steps(spec, plain_model, Plain(plain_model, args.lr, clipping), batches, args.window, plain_autocast)
    ds = run_steps(spec, ds_model, DeepSpeed(ds_model, args.lr, clipping, args.batch, args.zero_stage, bf16),
                   batches, args.window, contextlib.nullcontext)
    differences = [abs(a - b) / abs(a) for a, b in zip(plain, ds)]
    # The update must show: the loss moves by more than twice the sides' largest disagreement.
    moved = abs(plain[-1] - plain[0]) > max(2 * max(abs(a - b) for a, b in zip(plain, ds)), 1e-6 * abs(plain[0]))
    ok = max(differences) <= tolerance and moved
    print(f"# {device_name(device)}: {args.model} ({args.size}), ZeRO-{args.zero_stage}, "
          f"{args.dtype}, batch {args.batch}, W {args.window}")
    print("| step | plain loss | DeepSpeed loss | relative difference |\n|---:|---:|---:|---:|")
    for i, (a, b, d) in enumerate(zip(plain, ds, differences)):
        print(f"| {i + 1} | {a:.6f} | {b:.6f} | {d:.2e} |")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"deepspeed_step_{device.type}.json"
    out.write_text(json.dumps({"device": device_name(device), "torch": torch.__version__,
                               "deepspeed": deepspeed.__version__, "model": args.model, "size": args.size,
                               "zero_stage": args.zero_stage, "dtype": args.dtype,
                               "batch": args.batch, "window": args.window, "tolerance": tolerance,
                               "plain_losses": plain, "deepspeed_losses": ds, "relative_differences": differences,
                               "agree": ok}, indent=2))
    print(f"wrote {out}")
    if not moved:
        raise SystemExit(f"the loss moved too little over {args.steps} steps ({plain[0]:.6f} -> {plain[-1]:.6f}) "
                         "to show the update against the sides' difference: raise --lr or --steps")
    if not ok:
        raise SystemExit(f"DeepSpeed's losses differ from the plain steps' by up to {max(differences):.2e} "
                         f"(tolerance {tolerance:g})")


if __name__ == "__main__":
    main()

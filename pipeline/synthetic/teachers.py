"""Full-attention teachers trained on the synthetic corpus: the embedded default's teachers.

A plain single-process torch loop: these models are small enough that Ray would only add start-up
time. CE on the generated positions, over the spec's target ids (the speech codes and stop ids).
jobs/train_teachers.py runs it for the three families at the ``mini`` size and writes teachers/
(the tiny preset, 25k parameters, stalls near 46% held-out accuracy: too small to distill from).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

import wand
from wand.batch import Batch, collate
from wand.distill import backward_in_parts, length_groups as by_length
from wand.models import get_spec
from wand.models.presets import BUILDERS, widen

from pipeline.synthetic.law import TEXT_LENGTHS

__all__ = ["SIZE", "MINI_BACKBONE", "teacher_spec", "record_spec", "Phase", "CURRICULUM", "POSITION_EDGES", "Resume",
           "POSITION_INITS", "learned_position_tables", "sinusoidal_positions", "train_teacher",
           "teacher_forced_accuracy", "heldout_quality", "spoken_quality", "file_sha256", "read_teacher_record"]

log = logging.getLogger("wand.teachers")

SIZE = "mini"  # the embedded default's teachers: the tiny token layouts on a 3-layer, 96-wide backbone
# The committed teachers' backbone: wand.models.presets.widen's defaults (read, not restated).
MINI_BACKBONE = {k: p.default for k, p in inspect.signature(widen).parameters.items() if k != "spec"}


def teacher_spec(name: str, backbone: dict | None = None):
    """The family's ``mini`` spec, on another backbone when ``backbone`` (a teacher.json record's
    ``backbone``: width, layers, heads) differs from the preset's (a capacity experiment)."""
    if not backbone or backbone == MINI_BACKBONE:
        return get_spec(name, SIZE)
    return widen(BUILDERS[name]("tiny"), **backbone)


def record_spec(record: dict):
    """The spec a teacher.json record's weights load into: its size's preset, or the backbone it records."""
    if (record.get("backbone") or MINI_BACKBONE) == MINI_BACKBONE:
        return get_spec(record["model"], record["size"])
    return teacher_spec(record["model"], record["backbone"])


def _generated_logits(spec, model, batch: Batch, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits over target ids [N, V], targets as indices into target ids [N]) at every generated
    position of the batch."""
    logits = model(**batch.model_inputs(), window=window).logits
    targets = spec.target_ids().to(logits.device)
    index = torch.full((int(targets.max()) + 1,), -1, dtype=torch.long, device=logits.device)
    index[targets] = torch.arange(len(targets), device=logits.device)
    return logits[batch.batch_index, batch.positions][:, targets], index[batch.targets]


@dataclass(frozen=True)
class Phase:
    """One step of the teachers' length curriculum: ``steps`` batches of ``batch_size`` utterances
    whose texts are ``min_text`` .. ``max_text`` phonemes long."""

    steps: int
    min_text: int
    max_text: int
    batch_size: int


# The text alignment (which phoneme comes next, read from the prefix) is learned on short texts
# first: trained on the corpus's 40-120-phoneme texts from the start, the mini teachers stayed at
# chance at phoneme starts after 1,500 steps; on 4-12-phoneme texts the same model reaches 95% in
# 2,000 steps (measured), and each longer phase then extends it. The last phase is the corpus's own
# lengths (pipeline.synthetic.law.TEXT_LENGTHS).
CURRICULUM = (Phase(3000, 4, 12, 32), Phase(2000, 12, 40, 16), Phase(2500, *TEXT_LENGTHS, 8))


# How a teacher's learned position tables start (IndexTTS's text and mel positions; the Qwen2
# families' rotary positions have no table): "random", the backbone's own init (nn.Embedding's N(0, 1)),
# or "sinusoidal", the Transformer's sinusoids (Vaswani et al., 2017) scaled to the random table's
# standard deviation, still trained. Why: IndexTTS's teachers lose their place in the text more than the
# rotary families at every position (docs/results.md, the slips table), and a learned table only
# learns the positions the curriculum reaches often; sinusoids give every position a start where
# nearby positions are alike and offsets are linear maps.
POSITION_INITS = ("random", "sinusoidal")


def learned_position_tables(model: torch.nn.Module) -> dict[str, torch.nn.Embedding]:
    """The model's learned position tables by name (IndexTTS's ``text_pos_embedding.emb`` and
    ``mel_pos_embedding.emb``); empty for a model whose positions are rotary."""
    return {name: module for name, module in model.named_modules()
            if name.endswith("pos_embedding.emb") and isinstance(module, torch.nn.Embedding)}


def sinusoidal_positions(model: torch.nn.Module) -> list[str]:
    """Overwrite each learned position table with sinusoids (row p, columns 2i / 2i + 1: sin / cos of
    p / 10000^(2i / width)) times the table's standard deviation over a sinusoid's (1 / sqrt 2), in place;
    returns the tables' names. ValueError for a model without learned position tables."""
    tables = learned_position_tables(model)
    if not tables:
        raise ValueError(f"{type(model).__name__} has no learned position tables (its positions are rotary): "
                         "nothing for a sinusoidal init to set")
    with torch.no_grad():
        for table in tables.values():
            rows, width = table.weight.shape
            angle = torch.arange(rows, dtype=torch.float32)[:, None] / 10000 ** (
                torch.arange(0, width, 2, dtype=torch.float32) / width)
            waves = torch.zeros(rows, width)
            waves[:, 0::2], waves[:, 1::2] = torch.sin(angle), torch.cos(angle[:, : width // 2])
            table.weight.copy_(waves * (table.weight.std() / math.sqrt(0.5)))
    return list(tables)


@dataclass
class Resume:
    """Where ``train_teacher`` checkpoints its state (weights, optimizer, schedule, both generators,
    the curve so far) every ``every`` steps and at the end, so that a run killed or crashed after an
    hour continues from its last checkpoint when it is started again with the same ``recipe`` (a
    JSON-able description of everything the run depends on; a checkpoint of another recipe is refused,
    never silently continued). The resumed run lands on the same weights as an uninterrupted one.
    ``train_teacher`` fills in ``resumed_at`` (the steps it continued from) and ``seconds`` (training
    seconds over all the runs)."""

    path: Path
    recipe: dict
    every: int = 250
    resumed_at: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def saved_state(self) -> dict | None:
        """The checkpoint at ``path`` (None without one); ValueError naming the file if another recipe wrote it."""
        if not self.path.exists():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        # The recipe as JSON both sides: what was saved went through torch.save, tuples and lists alike.
        recipe, saved = json.loads(json.dumps(self.recipe)), json.loads(json.dumps(state["recipe"]))
        if saved != recipe:
            differ = sorted(k for k in {*recipe, *saved} if recipe.get(k) != saved.get(k))
            raise ValueError(f"{self.path} was written by another recipe (differs in {', '.join(differ)}): run the "
                             "command that wrote it again to continue it, or delete it to start over")
        return state


def _restore(resume: Resume, model, optimizer, schedule, rng, device) -> tuple[int, list[dict], float]:
    """(step, curve points, seconds) of ``resume.path`` with the states put back; (0, [], 0.0) without one."""
    state = resume.saved_state()
    if state is None:
        return 0, [], 0.0
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    rng.bit_generator.state = state["numpy_rng"]
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    resume.resumed_at.append(int(state["step"]))
    return int(state["step"]), list(state["points"]), float(state["seconds"])


def _checkpoint(resume: Resume, step: int, points, seconds: float, model, optimizer, schedule, rng, device) -> None:
    state = {"recipe": resume.recipe, "step": step, "points": points, "seconds": seconds,
             "model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
             "numpy_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state()}
    if torch.device(device).type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    # Written beside and renamed over: a kill while writing leaves the previous checkpoint whole.
    partial = resume.path.with_name(resume.path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, resume.path)


def train_teacher(spec, phases: Sequence[tuple[list[dict], int, int]], lr: float = 3e-3, seed: int = 0,
                  log_every: int = 100, curve: Callable[[torch.nn.Module], dict] | None = None,
                  curve_every: int = 500, device: str | torch.device = "cpu",
                  length_groups: int = 1, resume: Resume | None = None,
                  start: dict[str, torch.Tensor] | None = None,
                  position_init: str = "random") -> tuple[torch.nn.Module, list[dict]]:
    """A model of ``spec`` trained from seeded random weights with full attention, on each phase's
    ``(rows, steps, batch_size)`` in turn (a length curriculum); one learning-rate schedule over all
    of them (warm-up, then cosine down to a tenth). Returns the model, on the CPU (where the
    teachers are saved, scored and loaded), and its learning curve: ``curve(model)`` (in eval mode,
    no grad, on ``device``) every ``curve_every`` steps and at the end of each phase, each entry with
    its ``step`` and ``phase`` (empty without ``curve``). ``device``: where it trains ("cuda" on a GPU;
    the weights start the same for a seed, from the CPU's generator). ``length_groups``: each batch
    run in that many parts of neighbouring lengths (``wand.distill.backward_in_parts``: the same
    gradient up to rounding, less padding); 1, the committed teachers' single padded batch.
    ``resume``: checkpoint there and continue from it (see ``Resume``). ``start``: a state dict of
    ``spec``'s model (a trained teacher's) to begin from instead of the random weights: a continuation,
    with its own schedule over ``phases`` (the batch order still comes from ``seed``). ``position_init``:
    one of ``POSITION_INITS``, how the learned position tables start (not with ``start``)."""
    if length_groups < 1:
        raise ValueError(f"length_groups must be >= 1, got {length_groups}")
    if resume is not None and resume.every < 1:
        raise ValueError(f"Resume.every must be >= 1, got {resume.every}")
    if position_init not in POSITION_INITS:
        raise ValueError(f"position_init must be one of {', '.join(POSITION_INITS)}, got {position_init!r}")
    if position_init != "random" and start is not None:
        raise ValueError("position_init sets the position tables of random weights; a continuation (start) has its own")
    torch.manual_seed(seed)
    model = wand.enable_wand(spec.build(), None)
    if position_init == "sinusoidal":  # after the seeded random init: every other weight as without it
        sinusoidal_positions(model)
    if start is not None:
        model.load_state_dict(start)  # strict: a teacher of another backbone or family is refused here
    model = model.to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    ends = np.cumsum([steps for _, steps, _ in phases])  # the step at which each phase ends
    total = int(ends[-1]) if len(ends) else 0
    warmup = max(1, min(200, total // 20))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.1, 0.5 * (1 + math.cos(math.pi * min(s, total) / total))))
    rng = np.random.default_rng(seed)
    step, points, before = (0, [], 0.0) if resume is None else _restore(resume, model, optimizer, schedule, rng, device)
    if step:
        log.info("%s teacher: continuing at step %d/%d from %s", spec.name, step, total, resume.path)
    start = time.perf_counter()
    while step < total:
        phase = int(np.searchsorted(ends, step, side="right"))  # phases of 0 steps are passed over
        rows, _, batch_size = phases[phase]
        picked = [rows[i] for i in rng.integers(0, len(rows), batch_size)]
        optimizer.zero_grad(set_to_none=True)
        # CE only, over the target ids (the speech codes and stop ids): the distillation step without a teacher.
        loss = backward_in_parts(spec, model, [(collate(spec, group, device), None) for group in
                                               by_length(picked, min(length_groups, batch_size))],
                                 None, ce_over=spec.target_ids()).loss
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if log_every and (step % log_every == 0 or step == total - 1):
            log.info("%s teacher phase %d step %d/%d loss %.4f (%.0f s)", spec.name, phase, step, total,
                     loss.item(), before + time.perf_counter() - start)
        step += 1
        if curve is not None and (step % curve_every == 0 or step == ends[phase]):
            model.eval()
            with torch.no_grad():
                points.append({"step": step, "phase": phase, **curve(model)})
            log.info("%s teacher step %d: %s", spec.name, step, points[-1])
            model.train()
        if resume is not None and (step % resume.every == 0 or step == total):
            _checkpoint(resume, step, points, before + time.perf_counter() - start, model, optimizer, schedule, rng, device)
    if resume is not None:
        resume.seconds = before + time.perf_counter() - start
    return model.cpu().eval(), points


@torch.no_grad()
def teacher_forced_accuracy(spec, model, rows: list[dict], window: int | None = None,
                            batch_size: int = 16) -> dict[str, float]:
    """Top-1 accuracy against the corpus tokens at every generated position (teacher forcing),
    over the target ids, with the hard WAND mask at ``window`` (None: full attention). Returns
    ``accuracy``, ``positions`` and per-position arrays ``correct`` and ``distance`` (from the prefix)."""
    if not wand.is_enabled(model):
        wand.enable_wand(model, window)
    correct, distance = [], []
    for start in range(0, len(rows), batch_size):
        batch = collate(spec, rows[start : start + batch_size], next(model.parameters()).device)
        logits, labels = _generated_logits(spec, model, batch, window)
        correct.append((logits.argmax(-1) == labels).cpu())
        distance.append(batch.distance().cpu())
    correct_t, distance_t = torch.cat(correct), torch.cat(distance)
    return {"accuracy": float(correct_t.float().mean()), "positions": int(len(correct_t)),
            "correct": correct_t.numpy(), "distance": distance_t.numpy()}


# Generated positions (distance from the prefix) at which phoneme-start accuracy is reported apart:
# where along an utterance a teacher loses its place in the text (IndexTTS's mel positions are
# learned, and the long ones are trained almost only in the last phase of the length curriculum).
POSITION_EDGES = (0, 64, 128, 192, 256, 384)


def heldout_quality(spec, model, rows: list[dict]) -> dict:
    """The stated quality of a teacher on held-out rows made with ``alignment=True``: teacher-forced
    top-1 accuracy against the corpus tokens, overall, at phoneme starts (where the next phoneme
    must be read from the prefix) and inside phonemes (locally predictable); and at phoneme starts
    by generated position (``POSITION_EDGES``; a bucket without phoneme starts is left out)."""
    from pipeline.synthetic.law import phoneme_starts

    scored = teacher_forced_accuracy(spec, model, rows)
    starts = np.concatenate([phoneme_starts(r) for r in rows])
    correct, distance = scored["correct"], scored["distance"]
    by_position = {}
    for low, high in zip(POSITION_EDGES, (*POSITION_EDGES[1:], None)):
        at = starts & (distance >= low) & (distance < high if high is not None else True)
        if at.any():
            by_position[f"{low}-{high - 1}" if high is not None else f"{low}+"] = {
                "phoneme_starts": int(at.sum()), "accuracy": round(float(correct[at].mean()), 4)}
    return {"rows": len(rows), "positions": scored["positions"], "accuracy": round(scored["accuracy"], 4),
            "accuracy_phoneme_starts": round(float(correct[starts].mean()), 4),
            "accuracy_inside_phonemes": round(float(correct[~starts].mean()), 4),
            "phoneme_starts_by_position": by_position}


def spoken_quality(spec, model, rows: list[dict], task) -> dict:
    """What the teacher says on held-out rows made with ``alignment=True``, free-running greedy until
    the stop id (the results table's decoding): PER against the text, speaker accuracy, law
    consistency (pipeline/synthetic/transcribe.py) and the fraction that stopped."""
    from pipeline.evals.ablation import AblationConfig, said, VARIANTS

    full = next(v for v in VARIANTS if v.attends == "full")
    scores = said(spec, model, full, AblationConfig(), rows, task)
    keys = ("per", "substitutions", "deletions", "insertions", "speaker_accuracy", "law_consistency", "stopped",
            "length_ratio_median")
    return {"spoken_rows": len(rows), **{key: round(scores[key], 4) for key in keys},
            "per_by_row": [entry["per"] for entry in scores["per_row"]]}


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_teacher_record(directory) -> dict:
    """``teacher.json`` of a teacher folder written by jobs/train_teachers.py, with its files' sha256
    checked (a truncated or edited weights file is named, not loaded)."""
    directory = Path(directory)
    path = directory / "teacher.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: write the teachers with `python -m jobs.train_teachers`")
    record = json.loads(path.read_text())
    for name, digest in record["files"].items():
        file = directory / name
        if not file.exists():
            raise FileNotFoundError(f"{file} (listed in {path}) is missing")
        if file_sha256(file) != digest:
            raise ValueError(f"{file}: sha256 differs from {path}; retrain with `python -m jobs.train_teachers`")
    return record

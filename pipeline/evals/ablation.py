"""The results table's harness: WAND against its ablations on one trained teacher (issue 8).

One process, plain torch, so a researcher can rerun the whole table on a laptop CPU. The data path
is the pipeline's own: the precompute's top-k and shard encoding (``topk_of_rows``,
``build_shard_table``), the training worker's top-k decoding (``pipeline.data.shards.shard_topk``), collate
(``wand.batch.collate``) and step (``wand.distill.distill_loss``, via ``backward_in_parts``), ``wand.curriculum.Curriculum``,
the WAND mask and ``WandCache``, ``pipeline.evals.quality.position_scores``. What is not the pipeline's:
Ray, DeepSpeed and Parquet files (the shard tables stay in memory), and the loop (AdamW, random
batches): where the numbers are computed, not what they are.

Variants (every student starts from the teacher's weights and gets the same steps, rows, batches
and lr; W is the config's target window unless the variant sets its own):

- ``teacher``: the teacher itself, full attention (the reference).
- ``control``: the full-attention fine-tune: the same recipe (CE + KD, same steps) with no window,
  so a student-vs-control gap is the window's effect, not the recipe's.
- ``wand``: prefix + last W generated tokens; W shrinks on the curriculum, soft mask tau, CE + KD.
- ``wand_hold``: WAND whose curriculum ends at half the steps, then trains at the target W: the
  paper's cosine reaches the target only in the last steps, at a near-zero lr (``wand.curriculum``).
- ``window_only``: the same curriculum and mask, CE only (no teacher).
- ``kd_no_curriculum``: CE + KD with the hard mask at the target W from the first step.
- ``sinks``: StreamingLLM-style attention sinks (the first 4 tokens) + the last W, no prefix,
  fine-tuned with WAND's recipe (curriculum + KD): the sinks baseline given the same training.
- ``streaming_llm``: the same sinks + W cache on the teacher's weights, training-free as in the
  StreamingLLM paper.
- ``mask_only``: the teacher under the WAND mask (prefix + W) without fine-tuning.
- ``wand_w8``: WAND at W = 8 (curriculum 32 -> 8), a stress row: about two phonemes of history.
- ``wand_w<N>`` (any N, by name: ``variant_named``): WAND at W = N (curriculum 4N -> N), for the
  window sweep the chooser is checked against; ``wand_hold_w<N>``: the same with ``wand_hold``'s hold.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import wand
from wand.batch import collate
from wand.curriculum import Curriculum
from wand.distill import backward_in_parts, length_groups

from pipeline.data.precompute import topk_of_rows
from pipeline.data.shards import build_shard_table, shard_topk
from pipeline.evals.common import DISTANCE_BUCKETS, speech_ids
from pipeline.evals.decode import free_run, free_run_batch
from pipeline.evals.journal import Journal
from pipeline.evals.quality import distance_bucket, position_scores
from pipeline.synthetic.law import synthetic_rows, SyntheticTask, TEXT_LENGTHS
from pipeline.synthetic.transcribe import score, speech_codes_of

__all__ = ["AblationConfig", "Variant", "VARIANTS", "wand_at", "variant_named", "LONG_TEXT", "long_form_rows",
           "finetune_rows", "teacher_targets", "train_student", "free_run", "said", "forced", "score_variant",
           "run_ablation"]

log = logging.getLogger("wand.ablation")

FRESH_SEED = 2  # the students' fine-tuning rows: neither the teachers' training rows (0) nor held out (1)
DECODE_BATCH = 64  # free-running rows decoded together (the same tokens as one by one, tested)


@dataclass(frozen=True)
class AblationConfig:
    window: int = 32  # target W (tokens of generated history kept): the paper's 32 at 25 Hz
    window_start: int = 128  # curriculum start
    sinks: int = 4  # StreamingLLM's attention sinks
    steps: int = 300  # optimizer steps per trained student
    batch_size: int = 8
    lr: float = 1e-3
    k: int = 16  # teacher top-k kept for KD (as the precompute stage)
    kd_kind: str = "skew_fkl"
    seed: int = 0
    # Each batch run in parts of neighbouring lengths (wand.distill.backward_in_parts: the same rows and
    # gradient up to rounding, less padding; 2 parts: 1.0-1.25x faster per step on this CPU, measured by
    # benchmarks/length_groups.py). 1: the single padded batch the committed table was measured with.
    length_groups: int = 1
    # The fine-tuning rows' text lengths in phonemes (min, max): the corpus's by default; a long-form
    # table fine-tunes on the lengths its teacher was trained to, so the control keeps them too.
    finetune_text: tuple[int, int] = TEXT_LENGTHS

    def __post_init__(self) -> None:
        object.__setattr__(self, "finetune_text", tuple(self.finetune_text))  # a list when read from JSON
        if len(self.finetune_text) != 2 or not 1 <= self.finetune_text[0] <= self.finetune_text[1]:
            raise ValueError(f"finetune_text must be (min, max) phonemes, 1 <= min <= max, got {self.finetune_text}")
        if not 1 <= self.window <= self.window_start:
            raise ValueError(f"need 1 <= window <= window_start, got {self.window}, {self.window_start}")
        if self.sinks < 1 or self.steps < 1 or self.batch_size < 1 or self.k < 1:
            raise ValueError("sinks, steps, batch_size and k must be >= 1")
        if not 1 <= self.length_groups <= self.batch_size:
            raise ValueError(f"length_groups must be in [1, batch_size={self.batch_size}], got {self.length_groups}")


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    train: bool = False
    kd_weight: float = 1.0
    curriculum: bool = True
    attends: str = "prefix"  # "full" | "prefix" (prefix + W) | "sinks" (first tokens + W)
    window: int | None = None  # its own target W and curriculum start (None: the config's)
    window_start: int | None = None
    hold: float = 0.0  # the curriculum's hold_fraction (wand.curriculum): the last steps at the target W

    def target(self, config: AblationConfig) -> tuple[int, int]:
        """(target W, curriculum start) of this variant under ``config``."""
        return (self.window or config.window, self.window_start or config.window_start)


VARIANTS = (
    Variant("teacher", "teacher, full attention", attends="full"),
    Variant("control", "full-attention fine-tune: CE + KD, same steps, no window", train=True, attends="full"),
    Variant("wand", "WAND: prefix + W, curriculum + KD", train=True),
    Variant("wand_hold", "WAND, the curriculum over the first half of the steps, then the target W held",
            train=True, hold=0.5),
    Variant("window_only", "prefix + W, curriculum, no KD (CE only)", train=True, kd_weight=0.0),
    Variant("kd_no_curriculum", "prefix + W, KD, target W from step 0", train=True, curriculum=False),
    Variant("sinks", "4 sinks + W, no prefix, fine-tuned (curriculum + KD)", train=True, attends="sinks"),
    Variant("streaming_llm", "StreamingLLM: 4 sinks + W, no prefix, training-free", attends="sinks"),
    Variant("mask_only", "prefix + W on the teacher, no fine-tuning"),
    Variant("wand_w8", "WAND at W = 8 (curriculum 32 -> 8): stress row", train=True, window=8, window_start=32),
)


def wand_at(window: int, hold: bool = False) -> Variant:
    """WAND at its own W (curriculum 4W -> W, the headline's ratio): a row of the window sweep; with
    ``hold``, ``wand_hold``'s schedule (the curriculum over the first steps, then W held)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    fraction = next(v.hold for v in VARIANTS if v.name == "wand_hold") if hold else 0.0
    return Variant(f"wand_hold_w{window}" if hold else f"wand_w{window}",
                   f"WAND at W = {window} (curriculum {4 * window} -> {window}{', then held' if hold else ''})",
                   train=True, window=window, window_start=4 * window, hold=fraction)


def variant_named(name: str) -> Variant:
    """A variant of ``VARIANTS`` by name, or ``wand_w<N>`` / ``wand_hold_w<N>``: WAND at W = N (``wand_at``)."""
    for variant in VARIANTS:
        if variant.name == name:
            return variant
    for prefix, hold in (("wand_w", False), ("wand_hold_w", True)):
        window = name.removeprefix(prefix)
        if name.startswith(prefix) and window.isdigit() and int(window) >= 1:
            return wand_at(int(window), hold)
    raise ValueError(f"unknown variant {name!r}: one of {', '.join(v.name for v in VARIANTS)}, wand_w<N> "
                     "(WAND at W = N) or wand_hold_w<N> (the same, W held)")


# Long form: texts 1.5-2x the longest training text, where a teacher trained to the corpus's lengths
# can still be competent (issue 26: no long-form claim where the teacher fails; at 3-4x they did).
LONG_TEXT = (3 * TEXT_LENGTHS[1] // 2, 2 * TEXT_LENGTHS[1])


def long_form_rows(spec, task: SyntheticTask, n: int, seed: int) -> tuple[list[dict] | None, str | None]:
    """Held-out rows with texts 1.5-2x the longest training text, or (None, why not) where the model
    has no positions for them (IndexTTS's learned mel positions)."""
    rows = synthetic_rows(spec, n, task, seed=seed + 1000, min_text=LONG_TEXT[0], max_text=LONG_TEXT[1],
                          split="longform", alignment=True)
    longest_text = max(len(r["text"]) for r in rows)
    if longest_text < LONG_TEXT[0]:
        return None, (f"{spec.name} has {spec.max_generated_tokens} generated positions (learned), room for "
                      f"{longest_text}-phoneme texts at most")
    return rows, None


def finetune_rows(spec, n: int, task: SyntheticTask, config: AblationConfig, seed: int) -> list[dict]:
    """The students' ``n`` fine-tuning rows, their texts of ``config.finetune_text``'s lengths."""
    return synthetic_rows(spec, n, task, seed=seed, split="finetune", min_text=config.finetune_text[0],
                          max_text=config.finetune_text[1])


def teacher_targets(spec, teacher, rows: list[dict], k: int, value_dtype: str = "float16") -> list[dict]:
    """The rows as the training worker reads them from the shards: each with the teacher's top-k
    (full attention) in the shard columns, computed and encoded by the precompute's own code."""
    results = topk_of_rows(spec, teacher, rows, k, 1.0, 16384, torch.device("cpu"))
    return build_shard_table(rows, results, k, value_dtype, len(spec.target_ids())).to_pylist()


def curriculum_for(variant: Variant, config: AblationConfig) -> Curriculum:
    """The variant's lr / window / tau per step (the full-attention control reads only the lr)."""
    window, start = variant.target(config)
    if variant.curriculum and variant.attends != "full":
        return Curriculum(config.steps, start, window, lr=config.lr, hold_fraction=variant.hold)
    return Curriculum(config.steps, window, window, tau_end=None, lr=config.lr)


def train_student(spec, teacher, rows: list[dict], variant: Variant, config: AblationConfig,
                  value_dtype: str = "float16") -> torch.nn.Module:
    """A copy of ``teacher`` fine-tuned on ``rows`` (shard rows: ``teacher_targets``) with the variant's
    mask schedule and loss, through the training worker's collate, top-k decoding and distill step."""
    torch.manual_seed(config.seed)
    student = copy.deepcopy(teacher).train()
    curriculum = curriculum_for(variant, config)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=0.0)
    rng = np.random.default_rng(config.seed)  # the same batches for every variant
    target_ids = spec.target_ids()
    start = time.perf_counter()
    for step in range(config.steps):
        values = curriculum.at(step)
        for group in optimizer.param_groups:
            group["lr"] = values.lr
        picked = [rows[i] for i in rng.integers(0, len(rows), config.batch_size)]
        window, tau = (None, None) if variant.attends == "full" else (values.window, values.tau)
        parts = []
        for group in length_groups(picked, config.length_groups):
            batch = collate(spec, group)
            if variant.attends == "sinks":  # the mask keeps the first tokens, not the prefix
                batch = replace(batch, kept_prefix_lengths=torch.full_like(batch.prefix_lengths, config.sinks))
            parts.append((batch, shard_topk(group, target_ids, config.k, value_dtype)))
        optimizer.zero_grad(set_to_none=True)
        out = backward_in_parts(spec, student, parts, window, tau, kind=config.kd_kind, kd_weight=variant.kd_weight)
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == config.steps - 1:
            log.info("%s %s step %d/%d W=%s loss %.4f (ce %.4f kd %.4f) %.0f s", spec.name, variant.name, step,
                     config.steps, window, float(out.loss.detach()), float(out.ce), float(out.kd),
                     time.perf_counter() - start)
    return student.eval()


def attention(variant: Variant, config: AblationConfig, prefix: int) -> tuple[int | None, int]:
    """(window, prefix the mask and cache keep) of a variant on a row with ``prefix`` tokens."""
    if variant.attends == "full":
        return None, prefix
    return variant.target(config)[0], (config.sinks if variant.attends == "sinks" else prefix)


def latency_ratio(step_seconds: list[float], span: int = 48) -> float:
    """Median step time of the last ``span`` steps over that of ``span`` early steps (after 8 warm-up)."""
    early = step_seconds[8 : 8 + span]
    late = step_seconds[-span:]
    return statistics.median(late) / statistics.median(early)


def said(spec, model, variant: Variant, config: AblationConfig, rows: list[dict],
         task: SyntheticTask = SyntheticTask()) -> dict:
    """What a variant says, free-running greedy until the stop id (at most twice each reference's
    length): accuracy against the corpus, tokens before the first error, the stop rate and, when the
    rows carry their text and speaker, PER / speaker accuracy / law consistency (pipeline/synthetic/transcribe.py)."""
    # Up to twice the reference's length, as TTS evaluations decode to the end-of-speech token with
    # a generous cap: a model that speaks a little slower is not cut off mid-text.
    window = attention(variant, config, 0)[0]
    keeps = [attention(variant, config, row["prefix_length"])[1] for row in rows]
    # The model's own limit too (IndexTTS's learned mel positions): a batch advances every row together.
    limit = spec.max_generated_tokens or float("inf")
    caps = [min(2 * (len(row["input_ids"]) - row["prefix_length"]), limit) for row in rows]
    runs = []
    for start in range(0, len(rows), DECODE_BATCH):  # one left-padded batch decode per DECODE_BATCH rows
        part = slice(start, start + DECODE_BATCH)
        runs += free_run_batch(spec, model, rows[part], window, keeps[part], stop=True, max_tokens=caps[part])
    result = {"free_running_accuracy": float(np.mean([r["accuracy"] for r in runs])), "free_rows": len(runs),
              "stopped": float(np.mean([r["stopped"] for r in runs])),
              "free_running_matched": float(np.mean([r["matched"] for r in runs]))}
    # Generated tokens (the stop id included) over the reference's: 1.0 is the reference's length.
    ratios = [len(run["tokens"]) / (len(row["input_ids"]) - row["prefix_length"]) for run, row in zip(runs, rows)]
    result["length_ratio_median"] = float(np.median(ratios))
    per_row = [{"id": row["id"], "stopped": run["stopped"], "length_ratio": round(ratio, 4)}
               for run, row, ratio in zip(runs, rows, ratios)]
    if all("text" in row for row in rows):
        codes = len(speech_ids(spec))
        scores = [score(task, codes, speech_codes_of(spec, run["tokens"].tolist()), row["text"], row["speaker"])
                  for run, row in zip(runs, rows)]
        keys = ("per", "substitutions", "deletions", "insertions", "speaker_accuracy", "law_consistency")
        result.update({key: float(np.mean([s[key] for s in scores])) for key in keys})
        # Speaker accuracy weighted by tokens: a row that says little counts little.
        weights = np.array([s["tokens"] for s in scores], dtype=float)
        result["speaker_accuracy_tokens"] = float(np.average([s["speaker_accuracy"] for s in scores],
                                                             weights=weights)) if weights.sum() else 0.0
        for entry, s in zip(per_row, scores):
            entry.update({key: round(float(s[key]), 4) for key in keys}, tokens=s["tokens"])
    result["per_row"] = per_row
    return result


def forced(spec, teacher, model, variant: Variant, config: AblationConfig, rows: list[dict]) -> dict:
    """Teacher-forced agreement with the teacher and KL(teacher || variant) by distance from the
    prefix, and accuracy against the corpus tokens."""
    agree, kl, correct, buckets = [], [], [], []
    for row in rows:
        window, keep = attention(variant, config, row["prefix_length"])
        scores = position_scores(spec, teacher, model, window, row, torch.device("cpu"),
                                 student_prefix=keep if variant.attends == "sinks" else None)
        agree.append(scores["agree"])
        kl.append(scores["kl"])
        correct.append(scores["correct"])
        buckets += [distance_bucket(int(d), config.window) for d in scores["distance"]]
    agree_a, kl_a, buckets_a = np.concatenate(agree).astype(float), np.concatenate(kl), np.array(buckets)
    result = {"teacher_forced_accuracy": float(np.concatenate(correct).mean())}
    for name in DISTANCE_BUCKETS:
        pick = buckets_a == name
        result[f"agreement_{name}"] = float(agree_a[pick].mean()) if pick.any() else None
        result[f"kl_{name}"] = float(kl_a[pick].mean()) if pick.any() else None
        result[f"positions_{name}"] = int(pick.sum())
    return result


def score_variant(spec, teacher, model, variant: Variant, config: AblationConfig, heldout: list[dict],
                  free_rows: int, task: SyntheticTask = SyntheticTask(), long_form: list[dict] | None = None) -> dict:
    """The table's columns for one variant on held-out rows; with ``long_form`` (held-out rows far
    longer than any training row), the same content and distance columns there and the KV bytes after
    the longest of them, prefixed ``long_``."""
    result = {"variant": variant.name, "description": variant.description,
              **forced(spec, teacher, model, variant, config, heldout),
              **said(spec, model, variant, config, heldout[:free_rows], task)}
    # The longest held-out row, decoded to its length: KV bytes and the latency ratio.
    longest, long_run = _longest_run(spec, model, variant, config, heldout)
    result.update(kv_bytes_longest=long_run["cache_bytes"],
                  longest_tokens=len(longest["input_ids"]), longest_prefix=longest["prefix_length"],
                  latency_late_over_early=latency_ratio(long_run["step_seconds"]))
    if long_form:
        scores = {**forced(spec, teacher, model, variant, config, long_form),
                  **said(spec, model, variant, config, long_form, task)}
        result.update({f"long_{key}": value for key, value in scores.items()})
        result["long_generated_tokens"] = int(np.mean([len(r["input_ids"]) - r["prefix_length"] for r in long_form]))
        result["long_kv_bytes_longest"] = _longest_run(spec, model, variant, config, long_form)[1]["cache_bytes"]
    return result


def _longest_run(spec, model, variant: Variant, config: AblationConfig, rows: list[dict]) -> tuple[dict, dict]:
    """The row of ``rows`` with the most generated tokens and its decode to that length (free_run)."""
    longest = max(rows, key=lambda r: len(r["input_ids"]) - r["prefix_length"])
    return longest, free_run(spec, model, longest, *attention(variant, config, longest["prefix_length"]))


def run_ablation(spec, teacher, train_rows: list[dict], heldout: list[dict], config: AblationConfig,
                 variants=VARIANTS, free_rows: int = 8, task: SyntheticTask = SyntheticTask(),
                 seeds: tuple[int, ...] | None = None, long_form: list[dict] | None = None,
                 journal: Journal | None = None) -> list[dict]:
    """Table rows in ``variants`` order: one per training-free variant, one per seed of each trained
    variant (``seeds``, default ``(config.seed,)``: the student's batches and any randomness of its
    training). ``long_form``: held-out rows past the training lengths, scored as well. ``journal``:
    each result is added to it as it is finished, and one already there is taken from it, not measured
    again (a killed run continues; every student depends only on its seed, so it lands on the same figures)."""
    wand.enable_wand(teacher, config.window)
    teacher.eval()
    shard_rows = None  # the teacher's top-k of the training rows, computed once a student needs them
    results = []
    for variant in variants:
        for seed in (seeds or (config.seed,)) if variant.train else (None,):
            key = f"{variant.name} seed {seed}"
            if journal is not None and key in journal:
                log.info("%s %s seed %s: taken from %s", spec.name, variant.name, seed, journal.path)
                results.append(journal[key])
                continue
            if variant.train and shard_rows is None:
                shard_rows = teacher_targets(spec, teacher, train_rows, config.k)
            run_config = config if seed is None else replace(config, seed=seed)
            start = time.perf_counter()
            model = train_student(spec, teacher, shard_rows, variant, run_config) if variant.train else teacher
            trained = time.perf_counter() - start
            result = score_variant(spec, teacher, model, variant, run_config, heldout, free_rows, task, long_form)
            result.update(model=spec.name, seed=seed, train_seconds=round(trained, 1),
                          score_seconds=round(time.perf_counter() - start - trained, 1),
                          window=attention(variant, run_config, 0)[0],  # config: as JSON reads it back
                          config={**asdict(run_config), "finetune_text": list(run_config.finetune_text)})
            log.info("%s %s seed %s: %s", spec.name, variant.name, seed,
                     {k: v for k, v in result.items() if k != "config"})
            if journal is not None:
                journal.add(key, result)
            results.append(result)
    return results

"""Does the student keep the teacher's quality? Teacher-forced top-1 agreement and KL(teacher ||
student) by distance from the prefix (near < W, mid W .. 4W, far >= 4W), and what the models say
when they decode freely (PER, speaker, law, stops; synthetic rows only).
"""

from __future__ import annotations

import numpy as np
import torch

import wand
from wand.batch import forward_inputs

from pipeline.evals.common import new_figure, DISTANCE_BUCKETS, EvalResult, max_generated, speech_ids

# ----------------------------------------------------------------------------- quality
def distance_bucket(distance: int, window: int) -> str:
    return "near" if distance < window else "mid" if distance < 4 * window else "far"


@torch.no_grad()
def position_scores(spec, teacher, student, window: int | None, row: dict, device: torch.device,
                    student_prefix: int | None = None) -> dict[str, np.ndarray]:
    """Per generated position of one row: distance from the prefix, top-1 agreement, KL(teacher || student),
    and whether the student's top-1 is the row's true token.

    Both models see the row's true tokens (teacher forcing); the teacher with full attention, the
    student with the hard WAND mask at ``window`` (None: full attention) over the row's prefix, or
    over its first ``student_prefix`` tokens (e.g. 4 attention sinks for a StreamingLLM-style
    cache); distributions over the spec's target ids."""
    inputs = forward_inputs(spec, row, device)
    prefix = inputs.pop("prefix_length")
    prefix_lengths = torch.tensor([prefix], device=device)
    targets = spec.target_ids().to(device)
    logits = {}
    student_prefixes = prefix_lengths if student_prefix is None else torch.tensor([student_prefix], device=device)
    for name, model, w, p in (("teacher", teacher, None, prefix_lengths), ("student", student, window, student_prefixes)):
        out = model(**inputs, prefix_lengths=p, window=w, model_prefix_lengths=prefix_lengths)
        # position p predicts token p + 1: the generated tokens are predicted from p = prefix - 1 on
        logits[name] = out.logits[0, prefix - 1 : -1][:, targets].float()
    log_t, log_s = torch.log_softmax(logits["teacher"], -1), torch.log_softmax(logits["student"], -1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    agree = log_t.argmax(-1) == log_s.argmax(-1)
    truth = inputs["input_ids"][0, prefix:]
    correct = targets[log_s.argmax(-1)] == truth
    return {"distance": np.arange(len(kl)), "agree": agree.cpu().numpy(), "kl": kl.cpu().numpy(),
            "correct": correct.cpu().numpy()}


def quality(spec, teacher, student, window: int, rows: list[dict], device: torch.device) -> EvalResult:
    scores = [position_scores(spec, teacher, student, window, row, device) for row in rows]
    distance = np.concatenate([s["distance"] for s in scores])
    agree = np.concatenate([s["agree"] for s in scores]).astype(float)
    kl = np.concatenate([s["kl"] for s in scores])
    buckets = np.array([distance_bucket(int(d), window) for d in distance])
    table: dict[str, list] = {"bucket": [], "distance_range": [], "positions": [], "top1_agreement": [], "kl_teacher_student": []}
    metrics = {"top1_agreement": float(agree.mean()), "kl_teacher_student": float(kl.mean()),
               "heldout_rows": len(rows)}
    ranges = {"near": f"[0, {window})", "mid": f"[{window}, {4 * window})", "far": f">= {4 * window}"}
    for name in DISTANCE_BUCKETS:
        pick = buckets == name
        n = int(pick.sum())
        table["bucket"].append(name)
        table["distance_range"].append(ranges[name])
        table["positions"].append(n)
        table["top1_agreement"].append(float(agree[pick].mean()) if n else None)
        table["kl_teacher_student"].append(float(kl[pick].mean()) if n else None)
        metrics[f"positions_{name}"] = n
        if n:
            metrics[f"top1_agreement_{name}"] = table["top1_agreement"][-1]
            metrics[f"kl_{name}"] = table["kl_teacher_student"][-1]
    fig, ax = new_figure(f"{spec.name} ({spec.size}): student vs teacher by distance from the prefix",
                      "generated position (distance from the prefix)", "top-1 agreement")
    width = max(1, window // 2)
    edges = np.arange(0, distance.max() + width + 1, width)
    centers, agreement, divergence = [], [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        pick = (distance >= lo) & (distance < hi)
        if pick.any():
            centers.append((lo + hi) / 2)
            agreement.append(agree[pick].mean())
            divergence.append(kl[pick].mean())
    ax.plot(centers, agreement, marker="o", label="top-1 agreement")
    ax.set_ylim(0, 1.05)
    ax.axvline(window, color="grey", lw=0.5)
    ax.axvline(4 * window, color="grey", lw=0.5)
    twin = ax.twinx()
    twin.plot(centers, divergence, color="tab:red", marker="x", label="KL(teacher || student)")
    twin.set_ylabel("KL (nats)")
    fig.legend(loc="lower left")
    return EvalResult("quality", metrics, table, fig)


@torch.no_grad()
def content(spec, teacher, student, window: int, rows: list[dict], device: torch.device) -> EvalResult | None:
    """Does the student still say the text? On rows of the synthetic corpus (they carry ``text`` and
    ``speaker``), teacher (full attention) and student (WAND) decode greedily from each row's prefix
    until the stop id (at most twice the reference's length) and the speech is transcribed exactly
    (``pipeline.synthetic.transcribe``): PER, speaker accuracy, law consistency, how many stopped and
    the median length ratio (speech tokens before the stop over the reference's).
    None for rows without a transcript (real data needs an ASR model: not part of these evals)."""
    from pipeline.synthetic.law import SyntheticTask
    from pipeline.synthetic.transcribe import score, speech_codes_of

    rows = [r for r in rows if r.get("text") is not None and r.get("speaker") is not None]
    if not rows:
        return None
    codes = len(speech_ids(spec))
    metrics: dict[str, float] = {"content_rows": len(rows)}
    table: dict[str, list] = {"model": [], "per": [], "speaker_accuracy": [], "law_consistency": [], "stopped": [],
                              "length_ratio": []}
    for name, model, w in (("teacher", teacher, None), ("student", student, window)):
        said = []
        for row in rows:
            inputs = forward_inputs(spec, row, device)
            prefix = inputs.pop("prefix_length")
            reference = len(row["input_ids"]) - prefix
            cap = min(2 * reference, max_generated(spec) or 2 * reference)
            out = wand.generate(model, inputs.pop("input_ids")[:, :prefix], [prefix], w, cap,
                                eos_token_id=list(spec.stop_token_ids), prefill_kwargs=inputs)
            generated = out[0, prefix:].tolist()
            task = SyntheticTask(seed=int(row.get("task_seed") or 0))  # the law the corpus was made with
            result = score(task, codes, speech_codes_of(spec, generated), list(row["text"]), int(row["speaker"]))
            stops = [i for i, t in enumerate(generated) if t in spec.stop_token_ids]
            result["stopped"] = bool(stops)
            said_tokens = stops[0] if stops else len(generated)
            spoken = [t for t in row["input_ids"][prefix:] if t not in spec.stop_token_ids]
            result["length_ratio"] = said_tokens / max(1, len(spoken))  # speech tokens, stop ids not counted
            said.append(result)
        table["model"].append(name)
        for key in ("per", "speaker_accuracy", "law_consistency", "stopped"):
            value = float(np.mean([s[key] for s in said]))
            table[key].append(value)
            metrics[f"{key}_{name}"] = value
        # The median: one runaway row (no stop, twice the length) must not hide that the rest match.
        table["length_ratio"].append(float(np.median([s["length_ratio"] for s in said])))
        metrics[f"length_ratio_{name}"] = table["length_ratio"][-1]
    fig, ax = new_figure(f"{spec.name} ({spec.size}): what the models say (synthetic transcriber)", "metric", "value")
    keys = ("per", "speaker_accuracy", "law_consistency", "stopped")
    x = np.arange(len(keys))
    for i, name in enumerate(table["model"]):
        ax.bar(x + 0.4 * i, [table[k][i] for k in keys], width=0.4, label=name)
    ax.set_xticks(x + 0.2, ["PER", "speaker acc.", "law", "stopped"])
    ax.legend()
    return EvalResult("content", metrics, table, fig)

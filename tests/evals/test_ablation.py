"""The results table's harness: each variant's mask, cache and numbers against brute-force computations."""

import numpy as np
import pytest
import torch

import wand
from pipeline.evals.ablation import AblationConfig, curriculum_for, free_run, run_ablation, train_student, VARIANTS
from pipeline.evals.ablation import teacher_targets
from pipeline.data.shards import shard_topk
from pipeline.evals.common import speech_ids
from pipeline.evals.quality import position_scores
from wand.batch import forward_inputs
from pipeline.synthetic.law import synthetic_rows
from wand.models import get_spec

CONFIG = AblationConfig(window=4, window_start=8, steps=3, batch_size=2, lr=1e-2)


def setup(name):
    spec = get_spec(name, "tiny")
    torch.manual_seed(0)
    teacher = wand.enable_wand(spec.build().eval(), CONFIG.window)
    rows = synthetic_rows(spec, 6, seed=0, min_text=6, max_text=10)
    held = synthetic_rows(spec, 2, seed=1, min_text=14, max_text=18, split="heldout")
    return spec, teacher, rows, held


def brute_force_logits(spec, model, row, keep, window):
    """The model's own forward with a hand-built mask: query q sees key k <= q iff k < keep or q - k < W."""
    inputs = forward_inputs(spec, row, torch.device("cpu"))
    prefix = inputs.pop("prefix_length")
    length = inputs["input_ids"].shape[1]
    q, k = torch.arange(length)[:, None], torch.arange(length)[None, :]
    allowed = (k <= q) & ((k < keep) | (q - k < (window or length)))
    mask = torch.zeros(1, 1, length, length).masked_fill(~allowed, float("-inf"))
    extra = {"prefix_lengths": torch.tensor([prefix])} if spec.family == "indextts" else {}
    with torch.no_grad():
        out = model._wand_original_forward(input_ids=inputs["input_ids"], attention_mask=mask,
                                           position_ids=torch.arange(length)[None], **extra, **inputs_extra(inputs))
    return out.logits[0], prefix


def inputs_extra(inputs):
    return {k: v for k, v in inputs.items() if k != "input_ids"}


@pytest.mark.parametrize("name", ["sparktts", "indextts"])
def test_streaming_llm_scores_match_a_hand_built_sinks_plus_window_mask(name):
    spec, teacher, _, held = setup(name)
    row = held[0]
    scores = position_scores(spec, teacher, teacher, CONFIG.window, row, torch.device("cpu"), student_prefix=CONFIG.sinks)
    targets = spec.target_ids()
    full, prefix = brute_force_logits(spec, teacher, row, row["prefix_length"], None)
    sinks, _ = brute_force_logits(spec, teacher, row, CONFIG.sinks, CONFIG.window)
    log_t = torch.log_softmax(full[prefix - 1 : -1][:, targets], -1)
    log_s = torch.log_softmax(sinks[prefix - 1 : -1][:, targets], -1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1).numpy()
    np.testing.assert_allclose(scores["kl"], kl, atol=1e-4)
    assert (scores["agree"] == (log_t.argmax(-1) == log_s.argmax(-1)).numpy()).all()
    assert kl[4 * CONFIG.window:].min() > 1e-9  # the sinks mask does hide something at every far position
    truth = torch.tensor(row["input_ids"][prefix:])
    assert (scores["correct"] == (targets[log_s.argmax(-1)] == truth).numpy()).all()


def test_free_running_matches_recomputing_every_step_without_a_cache():
    spec, teacher, _, held = setup("sparktts")
    row = held[0]
    codes = speech_ids(spec)
    for keep, window in ((row["prefix_length"], None), (CONFIG.sinks, CONFIG.window), (row["prefix_length"], CONFIG.window)):
        run = free_run(spec, teacher, row, window, keep)
        prefix, ids = row["prefix_length"], torch.tensor(row["input_ids"])
        seq = ids[:prefix].tolist()
        for _ in range(len(ids) - prefix):
            # a placeholder last token: its own logits are not read, the one before predicts it
            logits, _ = brute_force_logits(spec, teacher, {**row, "input_ids": seq + [int(codes[0])]}, keep, window)
            seq.append(int(codes[logits[-2, codes].argmax()]))
        assert run["tokens"].tolist() == seq[prefix:], (keep, window)
        assert run["accuracy"] == pytest.approx(float((torch.tensor(seq[prefix:]) == ids[prefix:]).float().mean()))
        same = [a == b for a, b in zip(seq[prefix:], ids[prefix:].tolist())]
        assert run["matched"] == (same.index(False) if False in same else len(same))
        per_token = spec.kv_bytes_per_token(torch.float32)
        slots = prefix + len(ids) - prefix - 1 if window is None else keep + window
        assert run["cache_bytes"] == slots * per_token  # the last token is never fed back


def test_students_train_with_their_variants_schedule_and_loss():
    spec, teacher, rows, _ = setup("cosyvoice2")
    targets = teacher_targets(spec, teacher, rows, CONFIG.k)
    # The rows as the training worker reads them: decoded by its own shard_topk.
    stored = shard_topk(targets[:1], spec.target_ids(), CONFIG.k, "float16")
    # Independent: the stored top-k are the direct top-k of the teacher's full-attention softmax.
    inputs = forward_inputs(spec, rows[0], torch.device("cpu"))
    p = inputs.pop("prefix_length")
    with torch.no_grad():
        logits = teacher(**inputs, prefix_lengths=torch.tensor([p]), window=None).logits[0, p - 1 : -1]
    log_probs = torch.log_softmax(logits[:, spec.target_ids()], -1)
    top = log_probs.topk(CONFIG.k, -1)
    torch.testing.assert_close(stored.values, top.values, atol=1e-2, rtol=1e-3)  # stored as float16
    # The stored ids are a top-k (near-ties may come in another order): their own log-probs are the top values.
    compact = (stored.ids[..., None] == spec.target_ids()).float().argmax(-1)
    torch.testing.assert_close(log_probs.gather(-1, compact), top.values, atol=1e-4, rtol=0)
    torch.testing.assert_close(stored.rest.exp() + top.values.exp().sum(-1), torch.ones(len(top.values)), atol=1e-5, rtol=0)
    by_name = {v.name: v for v in VARIANTS}
    students = {name: train_student(spec, teacher, targets, by_name[name], CONFIG)
                for name in ("wand", "window_only", "kd_no_curriculum")}
    flat = {name: torch.cat([p.detach().flatten() for p in m.parameters()]) for name, m in students.items()}
    reference = torch.cat([p.detach().flatten() for p in teacher.parameters()])
    assert all(not torch.equal(v, reference) for v in flat.values())  # every student moved
    assert not torch.equal(flat["wand"], flat["window_only"])  # KD changes the update (same batches)
    assert not torch.equal(flat["wand"], flat["kd_no_curriculum"])  # so does the schedule
    schedule = curriculum_for(by_name["kd_no_curriculum"], CONFIG).schedule()
    assert {s.window for s in schedule} == {CONFIG.window} and {s.tau for s in schedule} == {None}
    schedule = curriculum_for(by_name["wand"], CONFIG).schedule()
    assert schedule[0].window == CONFIG.window_start and schedule[-1].window == CONFIG.window


def test_the_table_has_every_variant_with_consistent_columns():
    spec, teacher, rows, held = setup("sparktts")
    results = run_ablation(spec, teacher, rows, held, CONFIG, free_rows=1)
    assert [r["variant"] for r in results] == [v.name for v in VARIANTS]
    by = {r["variant"]: r for r in results}
    assert by["teacher"]["agreement_far"] == 1.0 and by["teacher"]["kl_far"] == pytest.approx(0.0, abs=1e-6)
    # Untrained variants on the teacher's weights: the mask alone sets their scores.
    assert by["mask_only"]["teacher_forced_accuracy"] != by["streaming_llm"]["teacher_forced_accuracy"] or \
        by["mask_only"]["kl_far"] != by["streaming_llm"]["kl_far"]
    # Trained students are scored with their own weights (not the teacher's they were copied from).
    assert by["wand"]["kl_far"] != by["mask_only"]["kl_far"] and by["wand"]["kl_far"] != by["window_only"]["kl_far"]
    per_token = spec.kv_bytes_per_token(torch.float32)
    longest = max(held, key=lambda r: len(r["input_ids"]) - r["prefix_length"])
    assert by["teacher"]["kv_bytes_longest"] == (len(longest["input_ids"]) - 1) * per_token
    assert by["wand"]["kv_bytes_longest"] == (longest["prefix_length"] + CONFIG.window) * per_token
    assert by["streaming_llm"]["kv_bytes_longest"] == (CONFIG.sinks + CONFIG.window) * per_token
    assert by["sinks"]["kv_bytes_longest"] == (CONFIG.sinks + CONFIG.window) * per_token
    assert by["control"]["kv_bytes_longest"] == by["teacher"]["kv_bytes_longest"]  # full attention
    assert by["wand_w8"]["kv_bytes_longest"] == (longest["prefix_length"] + 8) * per_token  # its own W
    assert by["control"]["kl_far"] != by["teacher"]["kl_far"] and by["sinks"]["kl_far"] != by["streaming_llm"]["kl_far"]
    for r in results:
        n = sum(r[f"positions_{b}"] for b in ("near", "mid", "far"))
        assert n == sum(len(h["input_ids"]) - h["prefix_length"] for h in held)
        assert 0 <= r["free_running_accuracy"] <= 1 and r["latency_late_over_early"] > 0


def test_students_of_several_seeds_and_long_form_rows_get_their_own_figures():
    from pipeline.evals.ablation import forced, said

    spec, teacher, rows, held = setup("sparktts")
    long_form = synthetic_rows(spec, 1, seed=5, min_text=40, max_text=44, split="longform", alignment=True)
    variants = [v for v in VARIANTS if v.name in ("teacher", "wand")]
    results = run_ablation(spec, teacher, rows, held, CONFIG, variants=variants, free_rows=1, seeds=(0, 1),
                           long_form=long_form)
    assert [(r["variant"], r["seed"]) for r in results] == [("teacher", None), ("wand", 0), ("wand", 1)]
    assert results[1]["config"]["seed"] == 0 and results[2]["config"]["seed"] == 1
    assert results[1]["kl_far"] != results[2]["kl_far"]  # another seed: other batches, another student
    # The long-form columns are the same functions on the long rows (recomputed here for the teacher).
    teacher_variant = variants[0]
    expected = {**forced(spec, teacher, teacher, teacher_variant, CONFIG, long_form),
                **said(spec, teacher, teacher_variant, CONFIG, long_form)}
    for key, value in expected.items():
        if key == "per_row":  # ids, flags and rounded figures: exact
            assert results[0]["long_per_row"] == value
        else:
            assert results[0][f"long_{key}"] == pytest.approx(value), key
    assert results[0]["long_generated_tokens"] == len(long_form[0]["input_ids"]) - long_form[0]["prefix_length"]
    assert results[0]["long_kl_far"] == pytest.approx(0.0, abs=1e-6)
    assert 0 <= results[1]["long_per"] and 0 <= results[1]["long_speaker_accuracy"] <= 1
    # KV after the longest long-form row: every token for the teacher, the prefix + W for WAND.
    per_token = spec.kv_bytes_per_token(torch.float32)
    assert results[0]["long_kv_bytes_longest"] == (len(long_form[0]["input_ids"]) - 1) * per_token
    assert results[1]["long_kv_bytes_longest"] == (long_form[0]["prefix_length"] + CONFIG.window) * per_token


@pytest.mark.parametrize("name", ["sparktts", "indextts"])
def test_a_batch_that_keeps_sinks_masks_like_a_hand_built_sinks_plus_window_mask(name):
    """The fine-tuned sinks baseline trains through Batch.kept_prefix_lengths: its forward is the
    model's own forward under a hand-built first-4 + last-W mask (IndexTTS still numbers its
    positions from the real prefix)."""
    from dataclasses import replace

    from wand.batch import collate

    spec, teacher, _, held = setup(name)
    row = held[0]
    batch = collate(spec, [row])
    batch = replace(batch, kept_prefix_lengths=torch.full_like(batch.prefix_lengths, CONFIG.sinks))
    with torch.no_grad():
        logits = teacher(**batch.model_inputs(), window=CONFIG.window).logits[0]
    expected, _ = brute_force_logits(spec, teacher, row, CONFIG.sinks, CONFIG.window)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    wand_logits, _ = brute_force_logits(spec, teacher, row, row["prefix_length"], CONFIG.window)
    assert not torch.allclose(logits, wand_logits, atol=1e-4)  # the prefix really is dropped


def test_the_full_attention_control_never_sees_a_window():
    """Same recipe as WAND but full attention: the config's window cannot change the control."""
    from dataclasses import replace

    spec, teacher, rows, _ = setup("cosyvoice2")
    targets = teacher_targets(spec, teacher, rows, CONFIG.k)
    control = next(v for v in VARIANTS if v.name == "control")
    a = train_student(spec, teacher, targets, control, CONFIG)
    b = train_student(spec, teacher, targets, control, replace(CONFIG, window=1, window_start=1))
    flat = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()])  # noqa: E731
    assert torch.equal(flat(a), flat(b)) and not torch.equal(flat(a), flat(teacher))


@pytest.mark.parametrize("name, trained", [("cosyvoice2", False), ("indextts", False), ("sparktts", False),
                                           ("sparktts", True)])
def test_a_batch_decode_says_what_each_row_says_alone(name, trained):
    """The PER columns decode all rows in one left-padded batch: per row, the same tokens, stop,
    accuracy and match as free_run on that row alone, for full attention, prefix + W and sinks + W.
    The committed (trained) teacher stops, so the stop path is exercised too."""
    from pathlib import Path

    from pipeline.evals.decode import free_run_batch

    spec, teacher, _, _ = setup(name)
    if trained:
        spec = get_spec(name, "mini")
        teacher = wand.enable_wand(spec.load(str(Path(__file__).resolve().parents[2] / "teachers" / name)), None)
    rows = synthetic_rows(spec, 4, seed=7, min_text=3, max_text=14, split="heldout")
    assert len({r["prefix_length"] for r in rows}) > 1  # the batch really is left-padded
    prefixes = [r["prefix_length"] for r in rows]
    caps = [2 * (len(r["input_ids"]) - p) for r, p in zip(rows, prefixes)]
    stopped = 0
    for window, keeps in ((None, prefixes), (CONFIG.window, prefixes), (CONFIG.window, [CONFIG.sinks] * 4)):
        batch = free_run_batch(spec, teacher, rows, window, keeps, stop=True, max_tokens=caps)
        for b, row in enumerate(rows):
            alone = free_run(spec, teacher, row, window, keeps[b], stop=True, max_tokens=caps[b])
            assert batch[b]["tokens"].tolist() == alone["tokens"].tolist(), (window, keeps[b], b)
            assert {k: batch[b][k] for k in ("stopped", "accuracy", "matched")} == \
                {k: alone[k] for k in ("stopped", "accuracy", "matched")}
            stopped += alone["stopped"]
    assert stopped > 0 or not trained


def test_free_running_stops_at_the_models_own_position_limit():
    """IndexTTS has learned mel positions: a student that never stops is cut at its last position,
    not at twice the reference (which would run past the positions and fail)."""
    from pipeline.evals.ablation import said

    spec, teacher, _, _ = setup("indextts")
    limit = spec.max_generated_tokens
    rows = [r for r in synthetic_rows(spec, 16, seed=3, min_text=55, max_text=58, split="heldout", alignment=True)
            if 2 * (len(r["input_ids"]) - r["prefix_length"]) > limit][:2]  # rows where the cap matters
    assert rows
    with torch.no_grad():  # a model that never says the stop id
        teacher.mel_head.bias[spec.stop_token_ids[0]] = -1e4
    result = said(spec, teacher, VARIANTS[0], CONFIG, rows)
    assert all(entry["tokens"] <= limit for entry in result["per_row"]) and len(result["per_row"]) == len(rows)
    assert [entry["tokens"] for entry in result["per_row"]] == [limit] * len(rows)  # it ran to the cap

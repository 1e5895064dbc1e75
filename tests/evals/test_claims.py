"""The results table's claims: bootstrap intervals against the normal approximation, paired per-row
differences against a direct computation, and the fixed thresholds' checks."""

import numpy as np
import pytest

from pipeline.evals.claims import bootstrap_ci, claims, per_row, reading, THRESHOLDS


def test_bootstrap_interval_matches_the_normal_approximation():
    values = np.random.default_rng(3).normal(0.05, 0.2, 400)
    ci = bootstrap_ci(values)
    half = 1.96 * values.std(ddof=1) / np.sqrt(len(values))  # independent: the CLT interval of the mean
    assert ci["mean"] == pytest.approx(values.mean())
    assert ci["low"] == pytest.approx(values.mean() - half, abs=0.2 * half)
    assert ci["high"] == pytest.approx(values.mean() + half, abs=0.2 * half)
    assert bootstrap_ci(values) == ci  # seeded: the same interval every run
    with pytest.raises(ValueError, match="at least 2"):
        bootstrap_ci([0.1])


def run(model, variant, seed, pers, stopped=1.0, speaker=1.0, ratio=1.0, window=32):
    rows = [{"id": f"r{i}", "per": p} for i, p in enumerate(pers)]
    return {"model": model, "variant": variant, "seed": seed, "per_row": rows, "per": float(np.mean(pers)),
            "substitutions": 0.0, "deletions": 0.0, "insertions": float(np.mean(pers)),
            "speaker_accuracy_tokens": speaker, "stopped": stopped, "length_ratio_median": ratio,
            "window": window}


def test_paired_differences_average_the_seeds_inside_each_row():
    rng = np.random.default_rng(0)
    control = [rng.uniform(0, 0.3, 64) for _ in range(3)]
    wand = [c + rng.normal(0.0, 0.01, 64) for c in control]
    teacher = rng.uniform(0, 0.3, 64)
    results = [run("m", "teacher", None, teacher)]
    results += [run("m", "control", s, control[s]) for s in range(3)]
    results += [run("m", "wand", s, wand[s]) for s in range(3)]
    assert list(per_row(results, "m", "wand").values()) == pytest.approx(np.mean(wand, axis=0))
    claim = claims(results)["m"]
    direct = np.mean(wand, axis=0) - np.mean(control, axis=0)  # per row, seeds averaged
    assert claim["minus_control"]["mean"] == pytest.approx(direct.mean())
    assert claim["minus_control"] == bootstrap_ci(direct)
    assert claim["minus_teacher"]["mean"] == pytest.approx((np.mean(wand, axis=0) - teacher).mean())
    assert claim["checks"] == {"control_gap_per": True, "speaker": True, "stops": True, "length_ratio": True}
    assert claim["passed"] and "passes every threshold" in reading("m", claim)


def test_each_threshold_can_fail():
    base = [0.1] * 32
    worse = [0.2] * 16 + [0.1] * 16  # +0.05 PER on average, every difference >= 0
    results = [run("m", "teacher", None, base), run("m", "control", 0, base),
               run("m", "wand", 0, worse, stopped=0.9, speaker=0.95, ratio=1.3)]
    claim = claims(results)["m"]
    assert claim["checks"] == {"control_gap_per": False, "speaker": False, "stops": False, "length_ratio": False}
    assert claim["minus_control"]["high"] > THRESHOLDS.control_gap_per and not claim["passed"]
    assert "beyond the 0.02 mark" in reading("m", claim)
    assert claim["teacher_misses"] == [] and "so does the teacher" not in reading("m", claim)
    # A check the teacher misses too is said to be the teacher's as well.
    results[0] = run("m", "teacher", None, base, speaker=0.96)
    claim = claims(results)["m"]
    assert claim["teacher_misses"] == ["speaker"]
    assert "speaker (so does the teacher), stops" in reading("m", claim)
    # A family without its control is not judged at all (no claim without the control).
    assert claims([r for r in results if r["variant"] != "control"]) == {}


def test_a_bound_a_hair_past_the_mark_is_printed_past_it():
    from pipeline.evals.claims import reading

    claim = {"minus_control": {"mean": -0.009, "low": -0.045, "high": 0.02012, "rows": 64}, "window": 32,
             "thresholds": {"control_gap_per": 0.02, "level": 0.95}, "checks": {"control_gap_per": False}}
    assert "[-0.0450, +0.0201]" in reading("m", claim)
    claim["minus_control"]["high"] = 0.031
    assert "[-0.045, +0.031]" in reading("m", claim)


def test_the_reading_says_where_the_interval_lies_against_0_and_the_mark_and_no_more():
    claim = {"minus_control": {"mean": 0.05, "low": 0.03, "high": 0.07, "rows": 64}, "window": 32,
             "thresholds": {"control_gap_per": 0.02, "level": 0.95}, "checks": {"control_gap_per": False}}
    assert "[+0.030, +0.070], the whole interval beyond the 0.02 mark;" in reading("m", claim)
    claim["minus_control"].update(mean=0.014, low=0.003, high=0.024)  # a cost, but not shown past the mark
    said = reading("m", claim)
    assert "[+0.003, +0.024], the whole interval above 0, its upper bound past the 0.02 mark;" in said
    assert "beyond" not in said
    claim["minus_control"].update(mean=0.01, low=-0.01, high=0.03)
    assert "a window cost above the 0.02 mark cannot be ruled out" in reading("m", claim)
    claim["minus_control"].update(mean=0.0, low=-0.01, high=0.015)
    assert "costs at most 0.015 PER" in reading("m", claim)


def test_runs_scored_on_other_rows_are_refused():
    results = [run("m", "teacher", None, [0.1, 0.2]), run("m", "control", 0, [0.1, 0.2]),
               run("m", "wand", 0, [0.1, 0.2])]
    results[2]["per_row"][1]["id"] = "other"
    with pytest.raises(ValueError, match="different rows"):
        claims(results)


def long_run(model, variant, seed, pers, kv=1000, **kw):
    """A result whose long-form rows carry ``pers`` (its held-out rows something else)."""
    base = run(model, variant, seed, [0.5, 0.5], **kw)
    return {**base, **{f"long_{k}": v for k, v in run(model, variant, seed, pers, **kw).items()
                       if k not in ("model", "variant", "seed", "window")}, "long_kv_bytes_longest": kv,
            "long_generated_tokens": 800, "long_agreement_far": 1.0, "long_kl_far": 0.0}


def test_long_form_claims_pair_the_long_rows_and_are_made_only_where_the_teacher_says_the_text():
    from pipeline.evals.long_form import long_form_markdown

    rng = np.random.default_rng(4)
    teacher = rng.uniform(0, 0.06, 48)
    control = [rng.uniform(0, 0.1, 48) for _ in range(2)]
    wand = [c + rng.normal(0.03, 0.01, 48) for c in control]
    results = ([long_run("m", "teacher", None, teacher, kv=900_000, window=None)]
               + [long_run("m", "control", s, control[s], kv=900_000, window=None) for s in range(2)]
               + [long_run("m", "wand_hold_w128", s, wand[s], kv=400_000, window=128) for s in range(2)])
    claim = claims(results, variant="wand_hold_w128", prefix="long_")["m"]
    direct = np.mean(wand, axis=0) - np.mean(control, axis=0)  # per long row, seeds averaged
    assert claim["minus_control"]["mean"] == pytest.approx(direct.mean()) and claim["minus_control"]["rows"] == 48
    assert claim["minus_teacher"]["mean"] == pytest.approx((np.mean(wand, axis=0) - teacher).mean())
    assert teacher.mean() <= THRESHOLDS.teacher_per and claim["judged"] is True
    assert claim["passed"] is False and claim["checks"]["control_gap_per"] is False  # a +0.03 cost
    # The held-out rows' claim is another: all rows 0.5 in every variant.
    assert claims(results, variant="wand_hold_w128")["m"]["minus_control"]["mean"] == pytest.approx(0.0)
    text = "\n".join(long_form_markdown(results))
    assert "Long-form claims" in text and "879 KiB -> 391 KiB" in text
    assert "| m | wand_hold_w128 | 128 | " + f"{direct.mean():+.3f}" in text

    # A teacher that does not say the long text: its students get no long-form claim.
    lost = [long_run("m", "teacher", None, teacher + 0.5, kv=900_000, window=None)] + results[1:]
    assert claims(lost, variant="wand_hold_w128", prefix="long_")["m"]["judged"] is False
    text = "\n".join(long_form_markdown(lost))
    assert "Long-form claims" not in text and "none: teacher fails" in text

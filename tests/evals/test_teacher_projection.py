"""Where more of a teacher's continuation recipe leads (pipeline/synthetic/teacher_projection.py):
the geometric fit to a chain's gains, checked against series stepped by hand, and the chain it follows."""

import pytest


def test_the_projection_of_a_continuation_chain_is_a_geometric_series_fit_to_its_gains():
    """pipeline/synthetic/teacher_projection.py: on figures that gain exactly a fraction r of the last
    gain per run, the fit finds r, the next figure and the series' limit, and the count of runs to a
    goal agrees with stepping the series by hand; gains that grow or change sign give no limit."""
    from pipeline.synthetic.teacher_projection import hindcast, project

    limit, first, r = 0.04, 0.05, 0.5
    values = [limit + first * r ** i for i in range(4)]  # 0.09, 0.065, 0.0525, 0.04625
    p = project(values, 0.042, lower_is_better=True)
    assert abs(p.ratio - r) < 1e-9 and abs(p.limit - limit) < 1e-9
    assert abs(p.next - (limit + first * r ** 4)) < 1e-9
    value, k = values[-1], 0
    while value > 0.042:  # brute force: step the series until it meets the goal
        k += 1
        value = limit + first * r ** (3 + k)
    assert p.reached_after == k == 2
    assert project(values, 0.03, True).reached_after is None  # below the limit: never
    assert project(values, 0.05, True).reached_after == 0  # met already
    rising = [1 - v for v in values]  # accuracy-like: higher is better
    up = project(rising, 0.958, lower_is_better=False)
    assert abs(up.limit - (1 - limit)) < 1e-9 and up.reached_after == k
    back = hindcast(values, 0.042, True)  # from the first three: the same series, so it foresaw the fourth
    assert abs(back.next - values[-1]) < 1e-9
    assert project([0.1, 0.09, 0.07], 0.05, True).ratio is None  # growing gains
    assert project([0.1, 0.08, 0.09], 0.05, True).ratio is None  # a gain of the other sign
    with pytest.raises(ValueError, match="at least 2 continuations"):
        project([0.1, 0.09], 0.05, True)


def test_a_projection_follows_the_last_runs_sources_of_one_recipe_and_leaves_branches_out():
    from pipeline.synthetic.teacher_projection import chain, projection_lines

    def record(name, per, starts, source=None, lr=3e-4, steps=1500):
        train = {"phases": [{"steps": steps, "min_text": 40, "max_text": 120, "batch_size": 8}], "steps": steps,
                 "lr": lr, "rows_per_phase": 8192, **({"init_from": {"files": {"llm.pt": source}}} if source else {})}
        return {"model": "cosyvoice2", "files": {"llm.pt": name},
                "heldout": {"per": per, "accuracy_phoneme_starts": starts}, "train": train}

    start = record("s", 0.09, 0.940, steps=11000, lr=3e-3)
    one, two = record("a", 0.065, 0.950, "s"), record("b", 0.0525, 0.955, "a")
    branch = record("x", 0.07, 0.945, "b", lr=1e-3)
    three = record("c", 0.04625, 0.9575, "b")
    assert chain([start, one, two, branch, three]) == [start, one, two, three]
    assert chain([start, one, two, three, branch]) == [two, branch]  # the branch's own recipe starts at b
    assert projection_lines([start, one, two, three, branch]) == []  # one continuation of its recipe: no fit
    lines = projection_lines([start, one, two, branch, three])
    assert lines[0].startswith("- projection of PER over runs 1, 2, 3, 5 (each 1,500-step continuation at lr 0.0003")
    assert "next 0.043, limit 0.040; meets 0.050 already" in lines[0]
    assert lines[1] == "  - made without run 5, the same projection said next 0.046; run 5 measured 0.046"
    assert "projection of phoneme starts" in lines[2] and "limit 96.0%; the limit misses 97.0%" in lines[2]
    worse = record("d", 0.06, 0.959, "c")  # a gain of the other sign: no limit, but the hindcast still shown
    lines = projection_lines([start, one, two, branch, three, worse])
    assert lines[0].endswith("fit to 4 gains): the gains do not shrink steadily: no limit from this curve")
    assert lines[1] == "  - made without run 6, the same projection said next 0.043; run 6 measured 0.060"

import math

import pytest

from wand.curriculum import Curriculum


def test_window_follows_the_paper_cosine():
    c = Curriculum(total_steps=101, window_start=128, window_target=32)
    assert c.window(0) == 128 and c.window(100) == 32
    assert c.window(50) == 80  # halfway on the cosine: the midpoint of 128 and 32
    windows = [c.window(s) for s in range(101)]
    assert all(a >= b for a, b in zip(windows, windows[1:]))  # never grows
    # Independent formula: W(t) = W0 - (1 - cos(pi t / T)) / 2 * (W0 - W)
    for t in (7, 33, 90):
        assert c.window(t) == round(128 - (1 - math.cos(math.pi * t / 100)) / 2 * 96)


def test_a_hold_ends_the_window_and_tau_schedule_early_and_keeps_the_lr():
    plain, held = Curriculum(total_steps=101, window_start=128, window_target=32), \
        Curriculum(total_steps=202, window_start=128, window_target=32, hold_fraction=0.5)
    # The first 101 steps of the held schedule are the whole 101-step schedule; then the target, hard.
    assert [held.window(s) for s in range(101)] == [plain.window(s) for s in range(101)]
    assert [held.tau(s) for s in range(101)] == pytest.approx([plain.tau(s) for s in range(101)])
    assert {held.window(s) for s in range(100, 202)} == {32}
    assert [held.tau(s) for s in range(100, 202)] == pytest.approx([1e4] * 102)
    unheld = Curriculum(total_steps=202, window_start=128, window_target=32)
    assert [held.learning_rate(s) for s in range(202)] == [unheld.learning_rate(s) for s in range(202)]


def test_tau_is_log_interpolated():
    c = Curriculum(total_steps=11, tau_start=0.5, tau_end=5e3)
    assert c.tau(0) == pytest.approx(0.5) and c.tau(10) == pytest.approx(5e3)
    assert c.tau(5) == pytest.approx(math.sqrt(0.5 * 5e3))  # midpoint of a log scale = geometric mean
    assert Curriculum(total_steps=5, tau_end=None).tau(3) is None


def test_learning_rate_warmup_then_cosine():
    c = Curriculum(total_steps=200, lr=1e-5, warmup_fraction=0.03)
    assert c.learning_rate(0) == pytest.approx(1e-5 / 6)
    assert c.learning_rate(5) == pytest.approx(1e-5)
    assert c.learning_rate(199) < 1e-7
    assert max(c.learning_rate(s) for s in range(200)) == pytest.approx(1e-5)


@pytest.mark.parametrize("total, count", [(100, 1), (100, 3), (7, 7), (1000, 4)])
def test_stages_concatenate_to_the_unsplit_schedule(total, count):
    c = Curriculum(total_steps=total, window_start=128, window_target=64)
    stages = c.stages(count)
    assert stages[0].start == 0 and stages[-1].end == total
    assert all(a.end == b.start for a, b in zip(stages, stages[1:]))
    assert sum((c.schedule(s) for s in stages), []) == c.schedule()


@pytest.mark.parametrize(
    "kwargs, field",
    [(dict(total_steps=0), "total_steps"), (dict(total_steps=10, window_target=200), "window_target"),
     (dict(total_steps=10, tau_start=0), "tau_start"), (dict(total_steps=10, lr=0), "lr"),
     (dict(total_steps=10, hold_fraction=1.0), "hold_fraction")],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Curriculum(**kwargs)
    with pytest.raises(ValueError, match="stages"):
        Curriculum(total_steps=3).stages(0)

"""Progress lines: at a steady interval, with an ETA from the mean step time."""

from pipeline.train.progress import Progress


def test_lines_come_at_the_interval_with_an_eta():
    now = [0.0]
    progress = Progress("exp stage 1/2", start=10, end=20, total=40, interval=30.0, clock=lambda: now[0])
    lines = []
    for step in range(10, 20):
        now[0] += 10.0  # 10 s a step, 100 tokens a step
        lines.append(progress.update(step, loss=1.5, window=16, tau=0.5, tokens=100))
    printed = [line for line in lines if line]
    assert lines[0] is not None and lines[-1] is not None  # the first and the last step
    assert [i for i, line in enumerate(lines) if line] == [0, 3, 6, 9]  # then every 30 s (3 steps of 10 s)
    first, last = printed[0], printed[-1]
    assert "step 11/40" in first and "this stage 1/10" in first and "W=16 tau=0.5" in first
    assert "stage ETA 1m30s" in first  # 9 steps left x 10 s
    assert "10 tokens/s" in last and "step 20/40" in last and "stage ETA 0s" in last
    assert "tau=hard" in Progress("x", 0, 1, 1).update(0, 1.0, 4, None, 5)

"""A batch run in parts of neighbouring lengths (wand.distill.backward_in_parts) gives the gradient of
the whole batch run at once, with and without a teacher, under the hard window and full attention."""

import pytest
import torch

import wand
from wand.batch import collate
from wand.distill import backward_in_parts, distill_loss, length_groups, SparseTeacher
from wand.models import get_spec
from wand.topk import sparse_teacher_targets


def rows_of(spec, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    lo, hi = spec.speech_range
    rows = []
    for i, n in enumerate(lengths):
        text = torch.randint(spec.reserved_text_ids, min(64, spec.text_vocab_size or 64), (4,), generator=g)
        speech = lambda m: torch.randint(lo, hi - len(spec.stop_token_ids), (m,), generator=g)  # noqa: E731
        ids, prefix = spec.layout(text, speech(2), speech(n), None)
        rows.append({"id": f"r{i}", "input_ids": ids.tolist(), "prefix_length": prefix, "prompt_length": 2})
    return rows


def teachers_of(spec, rows, k=4, seed=1):
    """Per row, a SparseTeacher over its generated positions (random logits, top-k by sparse_teacher_targets)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for row in rows:
        n = len(row["input_ids"]) - row["prefix_length"]
        logits = torch.randn(n, len(spec.target_ids()), generator=g) * 2
        out[row["id"]] = SparseTeacher(*sparse_teacher_targets(logits, torch.arange(len(spec.target_ids())), k))
    return out


def gradient(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("window,with_teacher", [(None, False), (3, True)])
def test_parts_give_the_whole_batch_gradient_and_loss(window, with_teacher):
    spec = get_spec("cosyvoice2", "tiny")
    torch.manual_seed(0)
    model = wand.enable_wand(spec.build(), None).train()
    rows = rows_of(spec, [5, 17, 9, 30, 12, 7, 22])
    teachers = teachers_of(spec, rows) if with_teacher else None
    pick = lambda group: SparseTeacher.cat([teachers[r["id"]] for r in group]) if teachers else None  # noqa: E731

    model.zero_grad()
    whole = distill_loss(spec, model, collate(spec, rows), window, None, pick(rows))
    whole.loss.backward()
    expected = gradient(model).clone()

    groups = length_groups(rows, 3)
    assert [len(g) for g in groups] == [3, 2, 2] and sorted(r["id"] for g in groups for r in g) == sorted(r["id"] for r in rows)
    lengths = [len(r["input_ids"]) for g in groups for r in g]
    assert lengths == sorted(lengths)  # neighbouring lengths together
    model.zero_grad()
    parts = backward_in_parts(spec, model, [(collate(spec, g), pick(g)) for g in groups], window, None)
    assert parts.positions == whole.positions
    assert float(parts.loss) == pytest.approx(float(whole.loss.detach()), rel=1e-5)
    assert float(parts.kd) == pytest.approx(float(whole.kd), rel=1e-5, abs=1e-7)
    assert torch.allclose(gradient(model), expected, rtol=1e-4, atol=1e-6)

    # One group is the batch as given, unsorted: exactly the single-batch step.
    assert length_groups(rows, 1) == [rows]
    model.zero_grad()
    backward_in_parts(spec, model, [(collate(spec, rows), pick(rows))], window, None)
    assert torch.equal(gradient(model), expected)


def test_length_groups_refuses_zero_and_keeps_every_row():
    with pytest.raises(ValueError, match="groups must be >= 1"):
        length_groups([{"input_ids": [1]}], 0)
    rows = [{"input_ids": [0] * n} for n in (3, 1, 2)]
    assert length_groups(rows, 5) == [[rows[1]], [rows[2]], [rows[0]]]  # more groups than rows: one row each

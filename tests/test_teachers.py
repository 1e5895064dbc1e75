"""The teacher training loop learns the synthetic corpus; its accuracy matches a direct computation."""

import torch

import wand
from pipeline.synthetic import synthetic_rows
from pipeline.teachers import teacher_forced_accuracy, train_teacher
from wand.models import get_spec


def test_training_beats_the_untrained_model_and_accuracy_is_exact():
    spec = get_spec("cosyvoice2", "tiny")
    rows = synthetic_rows(spec, 64, seed=0, min_text=8, max_text=16)
    held = synthetic_rows(spec, 8, seed=1, min_text=8, max_text=16, split="heldout")
    torch.manual_seed(0)
    untrained = teacher_forced_accuracy(spec, spec.build().eval(), held)["accuracy"]
    model = train_teacher(spec, rows, steps=60, batch_size=8, lr=1e-2, log_every=0)
    result = teacher_forced_accuracy(spec, model, held)
    assert result["accuracy"] > max(0.1, 3 * untrained), (result["accuracy"], untrained)
    # Independent: one unpadded forward per row, argmax over the target ids, compared by hand.
    targets = spec.target_ids()
    hits = total = 0
    with torch.no_grad():
        for row in held:
            ids = torch.tensor([row["input_ids"]])
            p = row["prefix_length"]
            logits = model(input_ids=ids, prefix_lengths=torch.tensor([p]), window=None).logits[0]
            guess = targets[logits[p - 1 : -1][:, targets].argmax(-1)]
            hits += int((guess == ids[0, p:]).sum())
            total += ids.shape[1] - p
    assert result["positions"] == total
    assert abs(result["accuracy"] - hits / total) < 1e-6
    assert isinstance(model, torch.nn.Module) and getattr(model, "_wand_original_forward", None) is not None
    wand.generate(model, torch.tensor([held[0]["input_ids"][: held[0]["prefix_length"]]]),
                  torch.tensor([held[0]["prefix_length"]]), 4, 5)  # the trained teacher decodes with a WandCache

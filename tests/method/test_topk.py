import pytest
import torch

from wand.topk import sparse_teacher_targets, target_positions


def test_topk_equals_direct_computation_and_mass_adds_up():
    torch.manual_seed(0)
    logits = torch.randn(37, 50) * 3
    target_ids = torch.tensor([3, 4, 5, 6, 7, 8, 9, 10, 20, 41])  # speech codes + a stop id
    for temperature in (1.0, 0.7):
        values, indices, rest = sparse_teacher_targets(logits, target_ids, k=4, temperature=temperature, chunk=8)
        logprobs = torch.log_softmax(logits / temperature, -1)
        direct_values, direct_index = torch.topk(logprobs[:, target_ids], 4, -1)
        assert torch.equal(indices, direct_index)
        torch.testing.assert_close(values, direct_values, atol=1e-6, rtol=0)
        # Mass: the k kept + the rest = 1, with rest computed independently here.
        kept = torch.zeros(37, 50, dtype=torch.bool).scatter(-1, target_ids[direct_index], True)
        direct_rest = torch.log(logprobs.exp().masked_fill(kept, 0).sum(-1))
        torch.testing.assert_close(rest, direct_rest, atol=1e-5, rtol=0)
        torch.testing.assert_close(values.exp().sum(-1) + rest.exp(), torch.ones(37), atol=1e-5, rtol=0)


def test_target_positions_and_errors():
    assert target_positions(3, 7).tolist() == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="k must be"):
        sparse_teacher_targets(torch.randn(2, 5), torch.arange(3), k=4)
    with pytest.raises(ValueError, match="temperature"):
        sparse_teacher_targets(torch.randn(2, 5), torch.arange(3), k=2, temperature=0)

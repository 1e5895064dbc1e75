"""KD losses against direct dense computations on small tensors."""

import math

import pytest
import torch
import torch.nn.functional as F

from wand.losses import KD_KINDS, divergence, wand_loss
from wand.topk import sparse_teacher_targets

V, D, N = 12, 8, 10


def setup(seed=0, k=4, temperature=1.0):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(D, V).double()
    hidden = torch.randn(N, D, generator=g, dtype=torch.float64, requires_grad=True)
    teacher_logits = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    targets = torch.randint(0, V, (N,), generator=g)
    values, index, rest = sparse_teacher_targets(teacher_logits, torch.arange(V), k, temperature)
    return head, hidden, teacher_logits, targets, values.double(), index, rest.double()


def dense_reference(p_full, q_full, topk, kind, alpha):
    """Coarse-grain both dense distributions to [top-k..., rest] bins, then the textbook formula."""
    out = []
    for n in range(p_full.shape[0]):
        keep = topk[n].tolist()
        p = [p_full[n, i].item() for i in keep] + [1 - sum(p_full[n, i].item() for i in keep)]
        q = [q_full[n, i].item() for i in keep] + [1 - sum(q_full[n, i].item() for i in keep)]
        kl = lambda a, b: sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)  # noqa: E731
        mix = lambda a, b, w: [w * x + (1 - w) * y for x, y in zip(a, b)]  # noqa: E731
        out.append({"fkl": kl(p, q), "rkl": kl(q, p), "skew_fkl": kl(p, mix(p, q, alpha)),
                    "skew_rkl": kl(q, mix(q, p, alpha)),
                    "jsd": 0.5 * kl(p, mix(p, q, 0.5)) + 0.5 * kl(q, mix(p, q, 0.5))}[kind])
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("kind", KD_KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_terms_equal_dense_computation(kind, temperature):
    head, hidden, teacher_logits, targets, values, index, rest = setup(k=4, temperature=temperature)
    out = wand_loss(hidden, head, targets, values, index, rest, kind=kind, kd_weight=0.5,
                    temperature=temperature, skew_alpha=0.1, chunk_size=3)
    logits = head(hidden)
    p = torch.softmax(teacher_logits / temperature, -1)
    q = torch.softmax(logits / temperature, -1)
    expected_kd = dense_reference(p, q, index, kind, 0.1).mean() * temperature**2
    expected_ce = F.cross_entropy(logits, targets)
    torch.testing.assert_close(out.kd.double(), expected_kd, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.ce.double(), expected_ce.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss.double(), (expected_ce + 0.5 * expected_kd).detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KD_KINDS)
def test_full_k_is_the_exact_dense_divergence(kind):
    head, hidden, teacher_logits, targets, values, index, rest = setup(k=V)
    out = wand_loss(hidden, head, targets, values, index, rest, kind=kind)
    log_p, log_q = torch.log_softmax(teacher_logits, -1), torch.log_softmax(head(hidden), -1)
    torch.testing.assert_close(out.kd.double(), divergence(log_p, log_q, kind).mean().detach(), atol=1e-6, rtol=0)
    out.loss.backward()
    assert torch.isfinite(hidden.grad).all()


@pytest.mark.parametrize("kind", KD_KINDS)
def test_zero_when_student_equals_teacher_and_gradients_finite(kind):
    head, hidden, _, targets, _, _, _ = setup()
    with torch.no_grad():
        teacher_logits = head(hidden)
    values, index, rest = sparse_teacher_targets(teacher_logits, torch.arange(V), 4)
    out = wand_loss(hidden, head, targets, values.double(), index, rest.double(), kind=kind)
    assert abs(out.kd.item()) < 1e-6
    out.loss.backward()
    assert torch.isfinite(hidden.grad).all() and hidden.grad.abs().sum() > 0


def test_tail_mass_treatment_is_coarse_grained():
    """Moving the student's probability around *inside* the teacher's tail changes nothing; moving
    mass between the top-k and the tail does (as the module docstring promises)."""
    teacher = torch.log_softmax(torch.tensor([[4.0, 3.0, 2.0, 0.0, 0.0, 0.0]], dtype=torch.float64), -1)
    values, index, rest = sparse_teacher_targets(teacher, torch.arange(6), 3)
    identity = torch.nn.Identity()  # "hidden" = the student's log-probs, so its head is the identity
    q_reshuffled = teacher.exp().clone()
    q_reshuffled[0, 3:] = torch.tensor([q_reshuffled[0, 3:].sum(), 0.0, 0.0])  # tail moved to one token
    out = wand_loss(torch.log(q_reshuffled + 1e-300), identity, torch.tensor([0]), values.double(), index,
                    rest.double(), kind="fkl")
    assert abs(out.kd.item()) < 1e-6  # the loss works in float32
    q_shifted = teacher.exp().clone()
    q_shifted[0, 0] -= 0.05
    q_shifted[0, 4] += 0.05  # top-k mass moved into the tail
    out = wand_loss(torch.log(q_shifted), identity, torch.tensor([0]), values.double(), index, rest.double(), kind="fkl")
    assert out.kd.item() > 1e-3


def test_chunking_does_not_change_loss_or_gradients():
    head, hidden, _, targets, values, index, rest = setup()
    grads = []
    for chunk in (2, 1000):
        h = hidden.detach().clone().requires_grad_(True)
        out = wand_loss(h, head, targets, values, index, rest, kind="skew_fkl", chunk_size=chunk)
        out.loss.backward()
        grads.append((out.loss.detach(), h.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_bad_arguments():
    head, hidden, _, targets, values, index, rest = setup()
    with pytest.raises(ValueError, match="unknown KD kind 'kl'.*fkl"):
        wand_loss(hidden, head, targets, values, index, rest, kind="kl")
    with pytest.raises(ValueError, match="skew_alpha"):
        wand_loss(hidden, head, targets, values, index, rest, skew_alpha=1.0)

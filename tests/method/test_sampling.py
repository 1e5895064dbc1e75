"""Token picking without a host read (wand.sampling), and the static step that picks its own token
(StaticDecoder(sampling=...)): the draw is torch.multinomial's, a step decodes its own last pick and
reads nothing back, and the stop bookkeeping moved onto the device cuts where the eager loop stops.
(Tokens against the default path, greedy and sampled, every family: tests/method/test_static.py,
which decodes through this step; on CUDA as a graph: tests/method/test_cuda.py.)"""

import pytest
import torch

import wand
from helpers import batch_of_three
from wand.generation import stopped_columns
from wand.profiling import host_reads
from wand.sampling import Sampling, sample_next_token
from wand.static import StaticDecoder

WINDOW = 4


def filtered_probs(logits: torch.Tensor, temperature: float, top_k, top_p) -> torch.Tensor:
    """The distribution a draw is from, row by row in plain Python: the top-k logits, then the
    fewest most likely of those whose mass reaches top_p (the one that crosses it kept)."""
    rows = []
    for row in (logits.float() / temperature).tolist():
        order = sorted(range(len(row)), key=lambda i: -row[i])
        kept = order[:top_k] if top_k else order
        if top_p is not None:
            probs = torch.tensor([row[i] for i in kept]).softmax(-1).tolist()
            mass, cut = 0.0, []
            for index, prob in zip(kept, probs):
                if mass > top_p:
                    break
                cut.append(index)
                mass += prob
            kept = cut
        full = torch.full((len(row),), float("-inf"))
        full[kept] = torch.tensor([row[i] for i in kept])
        rows.append(full.softmax(-1))
    return torch.stack(rows)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, None, None), (0.7, 30, None), (1.3, None, 0.9),
                                                       (0.9, 5, 0.5), (0.8, 40, 0.95)])
def test_a_draw_is_torch_multinomials_draw_from_the_same_generator(temperature, top_k, top_p):
    """Equal tokens and an equal generator state afterwards, for 30 seeds of 6 rows: the sync-free
    draw keeps every seeded result that torch.multinomial gave (it is multinomial's own method)."""
    logits = 3 * torch.randn(6, 300, generator=torch.Generator().manual_seed(0))
    reference = filtered_probs(logits, temperature, top_k, top_p)
    for seed in range(30):
        ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        got = sample_next_token(logits, True, temperature, top_k, top_p, ours)
        assert torch.equal(got, torch.multinomial(reference, 1, generator=theirs).squeeze(-1)), seed
        assert torch.equal(ours.get_state(), theirs.get_state())
        assert bool((reference.gather(1, got[:, None]) > 0).all())


def test_greedy_is_argmax_and_bad_settings_name_the_field():
    logits = torch.randn(4, 50)
    assert torch.equal(Sampling()(logits), logits.argmax(-1))
    for kwargs, field in [({"do_sample": True, "temperature": 0.0}, "temperature"), ({"top_k": -1}, "top_k"),
                          ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p")]:
        with pytest.raises(ValueError, match=field):
            Sampling(**kwargs)


def test_generate_checks_its_sampling_before_it_patches_the_model():
    build, ids, mask, prefix, kwargs = batch_of_three("qwen2")
    model = build()
    with pytest.raises(ValueError, match="temperature"):
        wand.generate(model, ids, prefix, WINDOW, 4, attention_mask=mask, do_sample=True, temperature=-1.0)
    assert not wand.is_enabled(model)


def test_stopped_columns_cut_where_the_eager_loop_stops():
    """Against the loop it replaces: a sample is finished from its first stop id on; the loop stops
    after the column that finished the last one."""
    gen = torch.Generator().manual_seed(3)
    eos = torch.tensor([2, 5])
    for _ in range(200):
        generated = torch.randint(0, 12, (int(torch.randint(1, 5, (1,), generator=gen)), 9), generator=gen)
        finished, expected = torch.zeros(generated.shape[0], dtype=torch.bool), generated.shape[1]
        for column in range(generated.shape[1]):
            finished |= torch.isin(generated[:, column], eos)
            if bool(finished.all()):
                expected = column + 1
                break
        assert stopped_columns(generated, eos) == expected


def prefilled_decoder(sampling, mode="eager", **kwargs):
    build, ids, mask, prefix, prefill = batch_of_three("qwen2")
    model = wand.enable_wand(build(), WINDOW)
    cache = wand.WandCache(prefix, WINDOW)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, prefix_lengths=prefix, use_cache=True, cache=cache, **prefill)
    return StaticDecoder(model, cache, mode, sampling=sampling, **kwargs), out.logits[:, -1]


def test_a_picking_step_equals_a_logits_step_and_the_pick_and_reads_nothing_back():
    """Two decoders over copies of one prefill: one returns logits (the token picked outside), one
    picks inside its step and continues from its own pick; sampled with one seed each, equal tokens.
    The picking step, draw and stop ids included, reads no device value back."""
    picking, logits = prefilled_decoder(Sampling(True, 0.9, 20, None, torch.Generator().manual_seed(4)),
                                        stop_ids=torch.tensor([90]), pad_token_id=0)
    plain, _ = prefilled_decoder(None)
    outside = torch.Generator().manual_seed(4)
    token = picking.pick(logits).clone()
    assert torch.equal(token, sample_next_token(logits, True, 0.9, 20, None, outside))
    finished = torch.isin(token, torch.tensor([90]))  # rows 1 and 2 meet it at steps 4 and 5, row 0 never
    for _ in range(3 * WINDOW):
        expected = torch.where(finished, 0, sample_next_token(plain.step(token), True, 0.9, 20, None, outside))
        finished |= expected == 90
        assert host_reads(picking.step) == {}
        token = picking.tokens.clone()
        assert torch.equal(token, expected) and torch.equal(picking.finished, finished)
    assert bool(finished.any()) and not bool(finished.all())  # a stop was met, and later picks padded


def test_a_step_without_tokens_needs_a_decoder_that_picks():
    plain, _ = prefilled_decoder(None)
    with pytest.raises(ValueError, match="previous tokens"):
        plain.step()
    with pytest.raises(ValueError, match="sampling="):
        plain.pick(torch.zeros(3, 8))
    with pytest.raises(TypeError, match="Sampling"):
        prefilled_decoder({"do_sample": True})


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_compiled_greedy_step_picks_inside_the_compiled_graph():
    """Under torch.compile an argmax pick is part of the compiled step: one host operator per step
    (the compiled call; the profiler's count), where a draw adds its own eager operators after it."""
    from wand.profiling import launches_per_step

    ops = {}
    for sampling in (Sampling(), Sampling(True, 0.9, 20)):
        decoder, logits = prefilled_decoder(sampling, "compile")
        decoder.pick(logits)
        for _ in range(WINDOW + 2):  # compiled, past the ring's first wrap
            decoder.step()
        ops[sampling.do_sample] = launches_per_step(decoder.step, device=torch.device("cpu"))["aten_ops"]
    assert ops[False] == 1 and ops[True] > 5, ops

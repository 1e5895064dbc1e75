"""SparkTTS's three prompt forms (upstream cli/SparkTTS.py: process_prompt, process_prompt_control),
on the tiny spec with its ids read by ``with_tokenizer`` from a real (small) tokenizer."""

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast
from helpers import spark_tokenizer
from pipeline.data.corpus import RowChecker
from wand.models import get_spec
from wand.models.sparktts import SPECIAL_TOKENS

SEMANTIC, GLOBAL = 256, 32  # the tiny preset's codebooks


@pytest.fixture(scope="module")
def tokenizer():
    return spark_tokenizer(SEMANTIC, GLOBAL)


def tok(tokenizer, *names):
    return [tokenizer.convert_tokens_to_ids(n) for n in names]


def test_the_three_forms_token_by_token(tokenizer):
    spec = get_spec("sparktts", "tiny").with_tokenizer(tokenizer)
    text = torch.tensor(tok(tokenizer, "t3", "t9", "t1"))
    glob = torch.tensor([5, 0, 31] + [1] * (GLOBAL - 3))
    semantic = lambda codes: tok(tokenizer, *(f"<|bicodec_semantic_{c}|>" for c in codes))  # noqa: E731
    global_ids = tok(tokenizer, *(f"<|bicodec_global_{int(c)}|>" for c in glob))
    first = spec.speech_range[0]
    prompt, target = torch.tensor(semantic([7, 8])), torch.tensor(semantic([1, 2, 3]) + tok(tokenizer, "<|im_end|>"))
    assert (prompt - first).tolist() == [7, 8]

    # Voice cloning with the prompt's transcript: the prefix ends after the prompt's semantic tokens.
    ids, prefix = spec.layout(text, prompt, target, glob)
    expected = (tok(tokenizer, "<|task_tts|>", "<|start_content|>", "t3", "t9", "t1", "<|end_content|>",
                    "<|start_global_token|>") + global_ids + tok(tokenizer, "<|end_global_token|>", "<|start_semantic_token|>")
                + semantic([7, 8]) + semantic([1, 2, 3]) + tok(tokenizer, "<|im_end|>"))
    assert ids.tolist() == expected and prefix == len(expected) - 4
    assert spec.prefix_lengths(ids[None], prompt_lengths=[2]).tolist() == [prefix]

    # Without a transcript: the prefix ends at <|end_global_token|>; <|start_semantic_token|> is generated.
    no_text = spec.with_prompt_form("clone_no_text")
    ids, prefix = no_text.layout(text, torch.tensor([], dtype=torch.long), target, glob)
    head = (tok(tokenizer, "<|task_tts|>", "<|start_content|>", "t3", "t9", "t1", "<|end_content|>",
                "<|start_global_token|>") + global_ids + tok(tokenizer, "<|end_global_token|>"))
    assert ids.tolist() == head + tok(tokenizer, "<|start_semantic_token|>") + semantic([1, 2, 3]) + tok(tokenizer, "<|im_end|>")
    assert prefix == len(head) and no_text.prefix_lengths(ids[None]).tolist() == [prefix]
    with pytest.raises(ValueError, match="no prompt speech"):
        no_text.layout(text, prompt, target, glob)

    # Controllable TTS: style labels end the prefix; the global tokens are generated, not given.
    control = spec.with_prompt_form("controllable")
    ids, prefix = control.layout(text, torch.tensor([], dtype=torch.long), target, glob, style=(1, 2, 4))
    head = tok(tokenizer, "<|task_controllable_tts|>", "<|start_content|>", "t3", "t9", "t1", "<|end_content|>",
               "<|start_style_label|>", "<|gender_1|>", "<|pitch_label_2|>", "<|speed_label_4|>", "<|end_style_label|>")
    generated = (tok(tokenizer, "<|start_global_token|>") + global_ids
                 + tok(tokenizer, "<|end_global_token|>", "<|start_semantic_token|>") + semantic([1, 2, 3])
                 + tok(tokenizer, "<|im_end|>"))
    assert ids.tolist() == head + generated and prefix == len(head)
    assert control.prefix_lengths(ids[None]).tolist() == [prefix]
    with pytest.raises(ValueError, match="style pitch must be in"):
        control.layout(text, torch.tensor([], dtype=torch.long), target, glob, style=(1, 5, 0))

    # Each form's generated part is made of its own target ids, so the row checks accept its rows,
    # and a clone-form spec refuses the controllable rows (their generated part holds global tokens).
    row = {"id": "c", "input_ids": ids.tolist(), "prefix_length": prefix}
    assert RowChecker(control).reason(row) is None
    assert "is not a speech or stop id" in RowChecker(spec).reason(row)
    assert set(generated) <= set(control.target_ids().tolist())


def test_the_controllable_form_needs_the_checkpoints_tokenizer():
    with pytest.raises(ValueError, match="with_tokenizer"):
        get_spec("sparktts", "tiny").with_prompt_form("controllable")
    with pytest.raises(ValueError, match="prompt_form must be one of"):
        get_spec("sparktts", "tiny").with_prompt_form("sing")


def test_a_tokenizer_without_sparks_tokens_is_refused():
    vocab = {"<unk>": 0, "a": 1}
    plain = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")), unk_token="<unk>")
    with pytest.raises(ValueError, match="lacks Spark's tokens"):
        get_spec("sparktts", "tiny").with_tokenizer(plain)


def test_the_real_spark_spec_takes_its_ids_from_the_checkpoint_folder(tmp_path):
    """At real size Spark's ids exist only in the checkpoint's LLM/tokenizer.json: the pipeline's
    stage configs read them from teacher_source (a folder or s3://) instead of failing on target_ids."""
    from pipeline.config import PrecomputeConfig
    from wand.models import spec_for

    semantic, glob = 8192, 4096
    names = ["<unk>"] + [f"t{i}" for i in range(10)] + list(SPECIAL_TOKENS)
    names += [f"<|bicodec_global_{i}|>" for i in range(glob)] + [f"<|bicodec_semantic_{i}|>" for i in range(semantic)]
    vocab = {name: i for i, name in enumerate(names)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")), unk_token="<unk>")
    tok.save_pretrained(str(tmp_path / "Spark-TTS-0.5B" / "LLM"))
    spec = spec_for("sparktts", "real", str(tmp_path / "Spark-TTS-0.5B"))
    first = vocab["<|bicodec_semantic_0|>"]
    assert spec.speech_range == (first, first + semantic) and spec.stop_token_ids == (vocab["<|im_end|>"],)
    assert spec.prefix_end_token_id == vocab["<|start_semantic_token|>"] and len(spec.target_ids()) == semantic + 1
    config = PrecomputeConfig(model="sparktts", model_size="real", teacher_source=str(tmp_path / "Spark-TTS-0.5B"),
                              corpus="c", shards="s")
    assert config.spec().speech_range == spec.speech_range
    with pytest.raises(ValueError, match="LLM/tokenizer.json"):
        spec_for("sparktts", "real", str(tmp_path))  # not the checkpoint folder

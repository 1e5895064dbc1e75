"""Test helpers: random sequences in each spec's layout (see pipeline/synthetic/random_corpus.py)."""

from pipeline.synthetic.random_corpus import corpus_rows, make_row  # noqa: F401


def ray_auth_headers() -> dict[str, str]:
    """The bearer header for this process's Ray token (RAY_AUTH_TOKEN_PATH, set by conftest)."""
    import os
    from pathlib import Path

    return {"Authorization": "Bearer " + Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text().strip()}


def ray_session_dirs(gcs_port: int) -> list:
    """The session folders (/tmp/ray/session_*) of the live Ray cluster whose GCS is on ``gcs_port``,
    read off its processes' command lines."""
    import re
    from pathlib import Path

    import psutil

    found = set()
    for proc in psutil.process_iter(["cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        if f":{gcs_port}" in line:
            found.update(re.findall(r"(/\S*?/session_[0-9_-]+)(?=[/\s]|$)", line))
    return sorted(Path(p) for p in found if Path(p).is_dir())


def _files_with(needle: bytes, roots) -> tuple[int, list[str]]:
    import stat
    from pathlib import Path

    scanned, hits = 0, []
    for root in roots:
        for path in Path(root).rglob("*"):
            try:
                if not stat.S_ISREG(path.lstat().st_mode) or path.stat().st_size > 200_000_000:
                    continue
                scanned += 1
                if needle in path.read_bytes():
                    hits.append(str(path))
            except OSError:
                continue
    return scanned, hits


def token_leaks(token: str, runs_dir, mlflow_client, experiment_id: str, texts: list[str], ray_dirs) -> dict:
    """Where ``token`` appears: files under ``runs_dir``, MLflow params, tags and artifacts of every run
    in the experiment, the given texts (job logs), and Ray's session folders. Returns the counts of
    what was looked at (so a caller can check that the search saw something) and the places found."""
    import tempfile

    found = []
    files, hits = _files_with(token.encode(), [runs_dir])
    found += hits
    checked = 0
    with tempfile.TemporaryDirectory() as tmp:
        for run in mlflow_client.search_runs([experiment_id]):
            for kind, values in (("param", run.data.params), ("tag", run.data.tags)):
                for key, value in values.items():
                    checked += 1
                    if token in f"{key}={value}":
                        found.append(f"mlflow {kind} {key} of run {run.info.run_id}")
            dst = mlflow_client.download_artifacts(run.info.run_id, "", tmp)
            count, hits = _files_with(token.encode(), [dst])
            checked += count
            found += [f"mlflow artifact {h}" for h in hits]
    found += [f"text #{i}" for i, text in enumerate(texts) if token in text]
    ray_files, hits = _files_with(token.encode(), ray_dirs)
    found += hits
    return {"files": files, "mlflow": checked, "ray logs": ray_files, "found": found}


def left_padded(rows, pad: int):
    """(ids, mask) of a batch of 1-D id tensors, left-padded with ``pad`` (as generation wants)."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, width - len(row):] = row
        mask[b, width - len(row):] = 1
    return ids, mask


def batch_of_three(name: str):
    """(model factory, ids, mask, prefix lengths, prefill kwargs) for decoding tests: batch 3,
    left-padded, three different prefix lengths; a tiny backbone (qwen2 / llama / gpt2) or a tiny
    TTS spec (cosyvoice2 / indextts ...), deterministic weights."""
    import torch

    from conftest import VOCAB, tiny_model
    from wand.models import get_spec

    gen = torch.Generator().manual_seed(3)
    if name in ("qwen2", "llama", "gpt2"):
        ids, mask = left_padded([torch.randint(0, VOCAB, (n,), generator=gen) for n in (9, 4, 6)], 0)
        return (lambda: tiny_model(name)), ids, mask, torch.tensor([7, 4, 2]), {}
    spec = get_spec(name, "tiny")
    made = [make_row(spec, text, prompt, 0, seed=s) for s, (text, prompt) in enumerate([(5, 2), (2, 0), (3, 1)])]
    ids, mask = left_padded([row for row, _ in made], spec.speech_range[0])
    kwargs = {}
    if spec.family == "indextts":
        kwargs["conditioning_latents"] = torch.randn(3, spec.extra["num_latents"], spec.config["n_embd"], generator=gen)

    def build():
        torch.manual_seed(0)
        return spec.build().eval()

    return build, ids, mask, torch.tensor([p for _, p in made]), kwargs


def precomputed_tiny_corpus(root, seed: int):
    """32 random rows of tiny CosyVoice 2 under ``root/corpus`` and their teacher top-k (k 8, two
    shards of 16) under ``root/topk``; needs a running Ray. Returns ``root``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.config import PrecomputeConfig
    from pipeline.data.precompute import run_precompute
    from wand.models import get_spec

    spec = get_spec("cosyvoice2", "tiny")
    (root / "corpus").mkdir()
    pq.write_table(pa.Table.from_pylist(corpus_rows(spec, 32, seed=seed, min_gen=10, max_gen=24)),
                   root / "corpus" / "c.parquet")
    run_precompute(PrecomputeConfig(model="cosyvoice2", model_size="tiny", corpus=str(root / "corpus"),
                                    shards=str(root / "topk"), k=8, rows_per_shard=16))
    return root


def wand_speech(spec, model, window: int, prompt: dict, steps: int) -> list[int]:
    """What ``wand.generate`` says after a prompt row (``input_ids``, ``prefix_length``, the family's
    columns), cut at the first stop id: the reference the student's MLflow model is checked against."""
    import torch

    import wand

    ids = torch.tensor([prompt["input_ids"]])
    extra = spec.row_inputs([prompt]) if spec.row_columns else {}
    tokens = wand.generate(model, ids, [prompt["prefix_length"]], window, steps, eos_token_id=list(spec.stop_token_ids),
                           prefill_kwargs=extra)[0, ids.shape[1]:].tolist()
    stop = next((i for i, t in enumerate(tokens) if t in spec.stop_token_ids), len(tokens))
    return tokens[:stop]


def spark_tokenizer(semantic: int = 256, global_: int = 32):
    """A small real tokenizer holding every SparkTTS special, control, style and BiCodec token, numbered
    differently from the tiny preset, so ids read through ``spec.with_tokenizer`` must come from it."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from wand.models.sparktts import CONTROL_TOKENS, SPECIAL_TOKENS, STYLE_TOKENS

    names = ["<unk>"] + [f"t{i}" for i in range(40)] + list(reversed(SPECIAL_TOKENS)) + list(CONTROL_TOKENS)
    names += [pattern.format(i) for pattern, count in STYLE_TOKENS.values() for i in range(count)]
    names += [f"<|bicodec_global_{i}|>" for i in range(global_)] + [f"<|bicodec_semantic_{i}|>" for i in range(semantic)]
    vocab = {name: i for i, name in enumerate(names)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")), unk_token="<unk>")

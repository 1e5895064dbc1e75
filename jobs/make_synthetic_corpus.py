"""Write a synthetic AR-TTS corpus (pipeline/synthetic/law.py) in the corpus schema for a model preset.

    python -m jobs.make_synthetic_corpus --model cosyvoice2 --size tiny --rows 256 --output runs/corpus/syn-cosyvoice2
    python -m jobs.make_synthetic_corpus --model cosyvoice2 --size tiny --rows 32 --seed 1 --split heldout --output runs/corpus/syn-cosyvoice2-heldout

Speech tokens follow the phoneme being spoken (aligned to the text in the prefix), the speaker
(in the prefix) and the previous token; the same --task-seed gives the same law, --seed other
utterances. Deterministic: the same arguments write the same rows. Writes <output>/corpus.parquet:
the corpus columns (id, input_ids ending with the stop id, prefix_length, prompt_length, IndexTTS's
conditioning_latents) plus text, speaker and task_seed, which training ignores and the evals use to
transcribe what a model says (pipeline/synthetic/transcribe.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.synthetic.law import synthetic_rows, SyntheticTask
from wand.models import MODEL_NAMES, get_spec


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODEL_NAMES, default="cosyvoice2")
    parser.add_argument("--size", choices=("tiny", "mini", "small", "real"), default="tiny")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="which utterances")
    parser.add_argument("--task-seed", type=int, default=0, help="which law (phoneme codes, voices)")
    parser.add_argument("--split", default="train", help="row id prefix (train / heldout)")
    parser.add_argument("--min-text", type=int, default=40, help="fewest phonemes per utterance")
    parser.add_argument("--max-text", type=int, default=120, help="most phonemes (capped by the model's limits)")
    parser.add_argument("--output", type=Path, required=True, help="folder to write corpus.parquet into")
    args = parser.parse_args(argv)
    if args.rows < 1 or not 1 <= args.min_text <= args.max_text:
        parser.error("--rows must be >= 1 and 1 <= --min-text <= --max-text")
    rows = synthetic_rows(get_spec(args.model, args.size), args.rows, SyntheticTask(seed=args.task_seed), args.seed,
                          args.min_text, args.max_text, args.split, alignment=True)
    # Each row keeps its text and speaker (not used by training): the evals transcribe what a model
    # says against them (pipeline/synthetic/transcribe.py). The per-token alignment stays out of the corpus.
    for row in rows:
        del row["phoneme_index"]
        row["task_seed"] = args.task_seed
    args.output.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), args.output / "corpus.parquet")
    lengths = [len(r["input_ids"]) - r["prefix_length"] for r in rows]
    print(f"wrote {len(rows)} rows to {args.output / 'corpus.parquet'} (generated tokens {min(lengths)}..{max(lengths)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Write a random-token corpus in the corpus schema for a model preset (a pipeline smoke test).

    python -m jobs.make_random_corpus --model cosyvoice2 --size tiny --rows 64 --output runs/corpus/tiny-cosyvoice2

The tokens have the preset's layout (prefix marker, speech targets) but no structure to learn.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.synthetic.random_corpus import corpus_rows
from wand.models import MODEL_NAMES, get_spec


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODEL_NAMES, default="cosyvoice2")
    parser.add_argument("--size", choices=("tiny", "mini", "small", "real"), default="tiny")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-gen", type=int, default=6, help="fewest generated tokens per row")
    parser.add_argument("--max-gen", type=int, default=30, help="most generated tokens per row")
    parser.add_argument("--output", type=Path, required=True, help="folder to write corpus.parquet into")
    args = parser.parse_args(argv)
    rows = corpus_rows(get_spec(args.model, args.size), args.rows, args.seed, args.min_gen, args.max_gen)
    args.output.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), args.output / "corpus.parquet")
    print(f"wrote {len(rows)} rows to {args.output / 'corpus.parquet'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

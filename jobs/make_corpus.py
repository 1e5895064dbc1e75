"""Build a corpus (the precompute's input) from your tokenized data, in the released model's own layout.

    python -m jobs.make_corpus --model cosyvoice2 --input my_data.jsonl --output runs/corpus/my-cosyvoice2
    python -m jobs.make_corpus --model sparktts --input s3://bucket/records/ --output s3://bucket/corpus/spark \
        --tokenizer /models/Spark-TTS-0.5B/LLM
    ray job submit --working-dir . -- python -m jobs.make_corpus --model cosyvoice2 --input s3://bucket/records/ \
        --output s3://bucket/corpus/cv2 --rows-per-file 200000

Input: JSONL or Parquet files (a file or a folder, local or s3://), one record per utterance: id,
text_ids (or text with --tokenizer), prompt_codes (optional), target_codes, and per family
global_codes (Spark) or conditioning_latents (IndexTTS). See pipeline/data/corpus_builder.py and
docs/bring-your-own.md for each family's fields. Runs as Ray Data work (pipeline/data/corpus_build.py:
one task per input file or 128 MiB piece of one, streaming; on the cluster it was submitted to, else a local Ray): output
<output>/part-*.parquet (at most --rows-per-file rows each, rows ending in the model's stop id) and,
written last, <output>/corpus.json (rows, files, fingerprint). Every record is checked (the layout,
the codec's code range, the precompute's row checks, ids unique across files); if any is bad, the
problems are listed (the first --max-problems of each kind, with file and line) and nothing is written.
"""

from __future__ import annotations

import argparse
import sys

from wand.models import get_spec, MODEL_NAMES
from wand.models.sparktts import PROMPT_FORMS

from pipeline import storage
from pipeline.cli import init_ray, setup_logging
from pipeline.data.corpus_build import build_corpus, CorpusProblems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=MODEL_NAMES)
    parser.add_argument("--size", default="real", choices=("real", "small", "mini", "tiny"))
    parser.add_argument("--input", required=True, help="a .jsonl / .parquet file or a folder of them (local or s3://)")
    parser.add_argument("--output", required=True, help="a new corpus folder (local or s3://): part-*.parquet and corpus.json go there")
    parser.add_argument("--tokenizer", default=None,
                        help="the model's text tokenizer (folder): for records with text instead of text_ids; "
                             "Spark needs it for its special-token ids")
    parser.add_argument("--prompt-form", default=None, choices=PROMPT_FORMS,
                        help="sparktts: clone (default; prompt transcript + prompt speech), clone_no_text "
                             "(global tokens only), controllable (style labels; records hold 'style')")
    parser.add_argument("--s3-endpoint", default=None, help="an S3-compatible endpoint (MinIO, ...)")
    parser.add_argument("--rows-per-file", type=int, default=100_000, help="rows per output Parquet file (default: %(default)s)")
    parser.add_argument("--max-problems", type=int, default=50,
                        help="problems listed per kind (read, record, duplicate); the rest are counted (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.rows_per_file < 1:
        parser.error(f"--rows-per-file {args.rows_per_file}: must be >= 1")
    if args.max_problems < 1:
        parser.error(f"--max-problems {args.max_problems}: must be >= 1")

    spec = get_spec(args.model, args.size)
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        spec = spec.with_tokenizer(tokenizer)  # Spark's special-token ids; the others hold theirs
    if args.prompt_form:
        if not hasattr(spec, "with_prompt_form"):
            parser.error(f"--prompt-form: {args.model} has one prompt form (only sparktts has three)")
        try:
            spec = spec.with_prompt_form(args.prompt_form)
        except ValueError as err:
            parser.error(f"--prompt-form {args.prompt_form}: {err}")
    settings = {"prompt_form": args.prompt_form, "tokenizer": bool(args.tokenizer), "rows_per_file": args.rows_per_file}
    setup_logging()
    try:
        storage.require_credentials(args.input, args.output)
        init_ray()
        manifest = build_corpus(spec, args.input, args.output, args.s3_endpoint, args.rows_per_file,
                                args.max_problems, args.tokenizer, settings=settings)
    except (CorpusProblems, ValueError, OSError) as err:
        print(str(err), file=sys.stderr)
        return 2
    print(f"wrote {manifest['rows']} rows in {len(manifest['files'])} file(s) to {args.output} "
          f"({spec.name} {spec.size} layout, stop id {manifest['stop_id']} after each row's targets; "
          f"fingerprint {manifest['fingerprint'][:16]}, manifest {args.output}/corpus.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

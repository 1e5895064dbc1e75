"""Build a corpus (the precompute's input) from your tokenized data, in the released model's own layout.

    python -m jobs.make_corpus --model cosyvoice2 --input my_data.jsonl --output runs/corpus/my-cosyvoice2
    python -m jobs.make_corpus --model sparktts --input records/ --output s3://bucket/corpus/spark \
        --tokenizer /models/Spark-TTS-0.5B/LLM

Input: JSONL or Parquet files (a file or a folder), one record per utterance: id, text_ids (or text
with --tokenizer), prompt_codes (optional), target_codes, and per family global_codes (Spark) or
conditioning_latents (IndexTTS). See pipeline/data/corpus_builder.py and docs/bring-your-own.md ("Bring your own model
and data") for each family's fields. Output: <output>/corpus.parquet with rows ending in the model's
stop id. Every record is checked first (the layout, the codec's code range, then the precompute's
row checks); if any is bad, all problems are listed and nothing is written.
"""

from __future__ import annotations

import argparse
import io
import json
import sys

import pyarrow as pa
import pyarrow.parquet as pq

from wand.models import get_spec, MODEL_NAMES
from wand.models.sparktts import PROMPT_FORMS

from pipeline import storage
from pipeline.data.corpus import check_batch
from pipeline.data.corpus_builder import build_rows


def read_records(uri: str, endpoint: str | None) -> tuple[list[dict], list[str], list[str]]:
    """(records, where each came from as 'file, line N' / 'file, row N', problems). Lines that are
    not JSON objects are problems listed by file and line, never a traceback."""
    fs, path = storage.resolve(uri, endpoint)
    info = fs.get_file_info(path)
    if info.type.name == "NotFound":
        raise SystemExit(f"--input: no such file or folder: {uri}")
    files = [path] if info.type.name == "File" else storage.list_files(fs, path, (".parquet", ".jsonl"))
    if not files:
        raise SystemExit(f"--input: no .jsonl or .parquet files at {uri}")
    records, origins, problems = [], [], []
    for name in files:
        if name.endswith(".parquet"):
            try:
                rows = pq.read_table(name, filesystem=fs).to_pylist()
            except (OSError, ValueError, pa.ArrowException) as err:
                problems.append(f"{name}: not a readable Parquet file ({str(err)[:200]})")
                continue
            records.extend(rows)
            origins.extend(f"{name}, row {number}" for number in range(1, len(rows) + 1))
            continue
        try:
            text = storage.read_bytes(fs, name).decode("utf-8")
        except UnicodeDecodeError as err:
            problems.append(f"{name}: not UTF-8 text (byte {err.start})")
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                problems.append(f"{name}, line {number}: not JSON ({err.msg}, column {err.colno})")
                continue
            except RecursionError:
                problems.append(f"{name}, line {number}: nested too deeply")
                continue
            if not isinstance(record, dict):
                problems.append(f"{name}, line {number}: a JSON {type(record).__name__}, not an object of fields")
                continue
            records.append(record)
            origins.append(f"{name}, line {number}")
    return records, origins, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=MODEL_NAMES)
    parser.add_argument("--size", default="real", choices=("real", "small", "mini", "tiny"))
    parser.add_argument("--input", required=True, help="a .jsonl / .parquet file or a folder of them (local or s3://)")
    parser.add_argument("--output", required=True, help="corpus folder (local or s3://); corpus.parquet goes there")
    parser.add_argument("--tokenizer", default=None,
                        help="the model's text tokenizer (folder): for records with text instead of text_ids; "
                             "Spark needs it for its special-token ids")
    parser.add_argument("--prompt-form", default=None, choices=PROMPT_FORMS,
                        help="sparktts: clone (default; prompt transcript + prompt speech), clone_no_text "
                             "(global tokens only), controllable (style labels; records hold 'style')")
    parser.add_argument("--s3-endpoint", default=None, help="an S3-compatible endpoint (MinIO, ...)")
    args = parser.parse_args(argv)

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
    records, origins, problems = read_records(args.input, args.s3_endpoint)
    if not records and not problems:
        print(f"--input {args.input}: holds no records; nothing was written", file=sys.stderr)
        return 2
    rows, row_problems = build_rows(spec, records, tokenizer, origins)
    problems += row_problems
    if rows:
        table = pa.Table.from_pylist([{**r, "path": args.input} for r in rows])
        problems += [f"record {c['id']!r}: {c['reason']}" for c in check_batch(table, spec).to_pylist() if c["reason"]]
    if problems:
        print(f"{len(problems)} problem(s) in {args.input} ({len(records)} readable record(s)); nothing was written:",
              file=sys.stderr)
        for line in problems[:50]:
            print(f"  {line}", file=sys.stderr)
        if len(problems) > 50:
            print(f"  ... and {len(problems) - 50} more", file=sys.stderr)
        return 2
    fs, root = storage.resolve(args.output, args.s3_endpoint)
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    storage.write_bytes(fs, storage.join(root, "corpus.parquet"), buffer.getvalue())  # whole or not at all
    generated = [len(r["input_ids"]) - r["prefix_length"] for r in rows]
    print(f"wrote {len(rows)} rows to {args.output}/corpus.parquet ({spec.name} {spec.size} layout; "
          f"{min(generated)}..{max(generated)} target tokens per row, stop id {spec.stop_token_ids[0]} included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

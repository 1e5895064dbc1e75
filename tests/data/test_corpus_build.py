"""The corpus builder as Ray Data work (pipeline/data/corpus_build.py) on a real local Ray: many
input files to many bounded part files and a manifest; the rows, counts and fingerprint checked
against a direct computation (build_row and row_hash record by record); all or nothing with
problems bounded; duplicates found across files; unfinished builds refused by every reader."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.corpus import row_hash
from pipeline.data.corpus_build import build_corpus, CorpusProblems
from pipeline.data.corpus_builder import build_row
from pipeline.data.corpus_io import corpus_files, read_manifest
from wand.models import get_spec

SPEC = get_spec("cosyvoice2", "tiny")
ROOT = Path(__file__).resolve().parents[2]


def records(n: int, start: int = 0) -> list[dict]:
    return [{"id": f"u{i:05d}", "text_ids": [1 + i % 7, 2], "prompt_codes": [i % 5],
             "target_codes": [3, 4 + i % 40, i % 61]} for i in range(start, start + n)]


def write_inputs(folder: Path, parts: list[list[dict]], parquet_every: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for number, part in enumerate(parts):
        if parquet_every and number % parquet_every == 0:
            pq.write_table(pa.Table.from_pylist(part), folder / f"in-{number}.parquet")
        else:
            (folder / f"in-{number}.jsonl").write_text("\n".join(json.dumps(r) for r in part) + "\n")


def read_corpus(folder: Path) -> list[dict]:
    return pa.concat_tables([pq.read_table(f) for f in corpus_files(str(folder), None)]).to_pylist()


def test_many_files_to_bounded_parts_and_a_manifest_checked_against_a_direct_build(ray_local, tmp_path):
    data = records(700)
    write_inputs(tmp_path / "in", [data[:300], data[300:301], data[301:]], parquet_every=2)
    manifest = build_corpus(SPEC, str(tmp_path / "in"), str(tmp_path / "out"), rows_per_file=128)
    expected = {r["id"]: build_row(SPEC, r) for r in data}  # record by record, no Ray, no batching
    rows = read_corpus(tmp_path / "out")
    assert {r["id"]: r for r in rows} == expected and len(rows) == len(data)
    on_disk = {f.name: pq.ParquetFile(f).metadata.num_rows for f in (tmp_path / "out").glob("*.parquet")}
    assert {f["name"]: f["rows"] for f in manifest["files"]} == on_disk and max(on_disk.values()) <= 128
    assert manifest["rows"] == 700 and manifest == read_manifest(str(tmp_path / "out"))
    direct = sum(int(row_hash(r), 16) for r in expected.values()) % (1 << 256)
    assert manifest["fingerprint"] == format(direct, "064x")
    assert not (tmp_path / "out" / "_staging").exists()
    # The same records split and sharded differently: the same fingerprint (order-independent).
    write_inputs(tmp_path / "in2", [data[500:], data[:500]])
    again = build_corpus(SPEC, str(tmp_path / "in2"), str(tmp_path / "out2"), rows_per_file=1000)
    assert again["fingerprint"] == manifest["fingerprint"] and len(again["files"]) == 2
    with pytest.raises(ValueError, match="already holds a corpus"):
        build_corpus(SPEC, str(tmp_path / "in2"), str(tmp_path / "out2"))


def test_duplicates_across_files_and_bounded_problems_publish_nothing(ray_local, tmp_path):
    data = records(50)
    write_inputs(tmp_path / "dup", [data[:30], data[25:]])  # u00025..u00029 in both files
    with pytest.raises(CorpusProblems) as err:
        build_corpus(SPEC, str(tmp_path / "dup"), str(tmp_path / "out"))
    text = str(err.value)
    assert "5 problem(s)" in text and "nothing was written" in text
    assert "in-1.jsonl, line 1: record 'u00025': duplicate id (first at " in text and "in-0.jsonl, line 26)" in text
    assert not (tmp_path / "out").exists()
    bad = records(120)
    for r in bad:
        r["target_codes"] = [999]
    bad[7] = "[1, 2]"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "in.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in bad))
    with pytest.raises(CorpusProblems) as err:
        build_corpus(SPEC, str(tmp_path / "bad"), str(tmp_path / "out"), max_problems=5)
    lines = str(err.value).splitlines()
    assert lines[0].startswith("120 problem(s)") and "in.jsonl, line 8: a JSON list, not an object of fields" in lines[1]
    assert lines[2].endswith("record 'u00000': target_codes holds 999, outside the codec's codes [0, 61)")
    assert lines[-1] == "  ... and 114 more record problem(s)" and len(lines) == 2 + 5 + 1
    assert not (tmp_path / "out").exists()


def test_an_unfinished_build_is_refused_by_the_readers(tmp_path):
    from pipeline.preflight import _corpus

    folder = tmp_path / "half"
    (folder / "_staging" / "abc").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([build_row(SPEC, r) for r in records(3)]), folder / "_staging/abc/part.parquet")
    with pytest.raises(ValueError, match="unfinished corpus build"):
        corpus_files(str(folder), None)
    assert "unfinished corpus build" in _corpus(str(folder), None, "corpus")[0]
    # A corpus made by hand (no manifest) is read as before; a manifest naming a lost file is refused.
    pq.write_table(pa.Table.from_pylist([build_row(SPEC, r) for r in records(3)]), tmp_path / "hand.parquet")
    assert corpus_files(str(tmp_path / "hand.parquet"), None) == [str(tmp_path / "hand.parquet")]
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "corpus.json").write_text(json.dumps({"files": [{"name": "part-0.parquet", "rows": 3}]}))
    with pytest.raises(ValueError, match="lists 1 file"):
        corpus_files(str(tmp_path / "m"), None)


def test_s3_in_and_out(ray_local, s3_server, tmp_path):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint)
    s3.create_bucket(Bucket="corpus-build")
    data = records(40)
    write_inputs(tmp_path / "in", [data[:20], data[20:]])
    for f in (tmp_path / "in").iterdir():
        s3.upload_file(str(f), "corpus-build", f"records/{f.name}")
    manifest = build_corpus(SPEC, "s3://corpus-build/records", "s3://corpus-build/built/cv2", rows_per_file=15)
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="corpus-build", Prefix="built/")["Contents"]
                  if not o["Key"].endswith("/"))
    assert keys == sorted(["built/cv2/corpus.json"] + [f"built/cv2/{f['name']}" for f in manifest["files"]])
    assert manifest["rows"] == 40 and read_manifest("s3://corpus-build/built/cv2") == manifest


def test_sampling_reads_only_the_files_holding_the_drawn_rows(ray_local, tmp_path):
    import random

    from pipeline.data.corpus_io import read_rows, sample_rows

    data = records(300)
    write_inputs(tmp_path / "in", [data[:150], data[150:]])
    manifest = build_corpus(SPEC, str(tmp_path / "in"), str(tmp_path / "out"), rows_per_file=50)
    every = pa.concat_tables([pq.read_table(tmp_path / "out" / f["name"]) for f in manifest["files"]]).to_pylist()
    drawn = sorted(random.Random(7).sample(range(300), 5))  # row numbers in manifest order
    expected = sorted((every[n] for n in drawn), key=lambda r: r["id"])
    unused = [f for number, f in enumerate(manifest["files"]) if not any(50 * number <= n < 50 * (number + 1)
                                                                         for n in drawn)]
    assert unused
    # The evals' read of a built corpus is the seed-0 sample.
    assert read_rows(str(tmp_path / "out"), None, 5) == sample_rows(str(tmp_path / "out"), None, 5, seed=0)
    for f in unused:  # a file the sample does not need is never opened
        (tmp_path / "out" / f["name"]).write_bytes(b"not parquet")
    assert sample_rows(str(tmp_path / "out"), None, 5, seed=7) == expected


def test_large_files_are_cut_into_pieces_read_in_parallel_with_the_whole_file_line_numbers(ray_local, tmp_path):
    """A JSONL file cut into byte ranges (cuts inside lines, on line starts, blank lines and a bad
    line near a cut) and a Parquet file cut by row groups build the same corpus as whole files, and
    problems name the line the whole file has."""
    from pipeline.data.corpus_inputs import input_files, pieces

    data = records(200)
    lines = [json.dumps(r) for r in data]
    lines[101] = "[1, 2]"  # a problem past the first cut
    (tmp_path / "one").mkdir()
    text = "\n".join(lines[:50]) + "\n\n" + "\n".join(lines[50:]) + "\n"  # a blank line 51
    (tmp_path / "one" / "big.jsonl").write_text(text)
    size = len(text.encode())
    cut = len(("\n".join(lines[:50]) + "\n\n").encode())  # a cut exactly on a line start
    files = input_files(str(tmp_path / "one"), None)
    assert [(p.get("start"), p.get("end")) for p in pieces(None, files, piece_bytes=cut)][:2] == [(0, cut), (cut, 2 * cut)]
    with pytest.raises(CorpusProblems) as err:
        build_corpus(SPEC, str(tmp_path / "one"), str(tmp_path / "out"), piece_bytes=997)
    assert str(err.value).splitlines()[1].endswith("big.jsonl, line 103: a JSON list, not an object of fields")
    good = "\n".join(json.dumps(r) for r in data[:50]) + "\n\n" + "\n".join(json.dumps(r) for r in data[50:]) + "\n"
    (tmp_path / "one" / "big.jsonl").write_text(good)
    for piece_bytes in (997, cut, size // 3):
        out = tmp_path / f"out-{piece_bytes}"
        manifest = build_corpus(SPEC, str(tmp_path / "one"), str(out), rows_per_file=64, piece_bytes=piece_bytes)
        assert manifest["inputs"]["pieces"] > 1 and manifest["inputs"]["files"] == 1
        assert {r["id"]: r for r in read_corpus(out)} == {r["id"]: build_row(SPEC, r) for r in data}
        assert manifest["rows"] == 200
    # A duplicate id across pieces of one file names both lines as the whole file numbers them.
    dup = data + [data[10]]
    (tmp_path / "dup").mkdir()
    (tmp_path / "dup" / "d.jsonl").write_text("\n".join(json.dumps(r) for r in dup) + "\n")
    with pytest.raises(CorpusProblems, match=r"d.jsonl, line 201: record 'u00010': duplicate id \(first at .*d.jsonl, line 11\)"):
        build_corpus(SPEC, str(tmp_path / "dup"), str(tmp_path / "out-dup"), piece_bytes=1500)
    # Parquet by row groups: rows numbered as the whole file.
    (tmp_path / "pq").mkdir()
    bad = [dict(r) for r in data]
    bad[150]["target_codes"] = [999]
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "pq" / "big.parquet", row_group_size=40)
    with pytest.raises(CorpusProblems, match=r"big.parquet, row 151: record 'u00150': target_codes holds 999"):
        build_corpus(SPEC, str(tmp_path / "pq"), str(tmp_path / "out-pq"), piece_bytes=1000)
    pq.write_table(pa.Table.from_pylist(data), tmp_path / "pq" / "big.parquet", row_group_size=40)
    manifest = build_corpus(SPEC, str(tmp_path / "pq"), str(tmp_path / "out-pq"), piece_bytes=1000)
    assert manifest["inputs"]["pieces"] > 1 and manifest["rows"] == 200
    assert {r["id"]: r for r in read_corpus(tmp_path / "out-pq")} == {r["id"]: build_row(SPEC, r) for r in data}


BLOCK_MODEL_CODE = """
import sys
class Block:  # an import of these fails: the data path must not need them
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers') or name in ('wand.patch', 'wand.models.cosyvoice2_lm'):
            raise ImportError('blocked ' + name)
sys.meta_path.insert(0, Block())
"""


def test_the_builders_data_path_loads_no_model_code(tmp_path):
    """What a data worker does with a piece (unpickle the FileBuilder, lay out, check, write) and the
    job's driver imports need the spec's token layout, never torch, transformers or WAND's model
    code: a worker starts in a fraction of a second instead of five and holds none of them (issue 28)."""
    import pickle
    import subprocess
    import sys

    from pipeline.data.corpus_build import _rows, FileBuilder
    from pipeline.data.corpus_inputs import input_files, pieces
    from pipeline import storage

    write_inputs(tmp_path / "in", [records(300)])
    items = pieces(storage.resolve(str(tmp_path / "in"), None)[0], input_files(str(tmp_path / "in"), None))
    builder = FileBuilder(SPEC, str(tmp_path / "in"), str(tmp_path / "staging"), None, 1000, 4, 50)
    (tmp_path / "task.pkl").write_bytes(pickle.dumps((builder, _rows(items)[0])))
    code = BLOCK_MODEL_CODE + (
        "import pickle, json\n"
        "import jobs.make_corpus\n"
        f"builder, piece = pickle.loads(open({str(tmp_path / 'task.pkl')!r}, 'rb').read())\n"
        "summary = builder(piece)\n"
        "print(json.dumps({'rows': summary['rows'], 'problems': summary['problems'],\n"
        "                  'loaded': sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"rows": 300, "problems": "{}", "loaded": []}
    # ... and the parts it wrote are the rows a direct build gives
    written = pa.concat_tables([pq.read_table(f) for f in sorted((tmp_path / "staging").glob("part-*.parquet"))])
    assert written.to_pylist() == [build_row(SPEC, r) for r in records(300)]

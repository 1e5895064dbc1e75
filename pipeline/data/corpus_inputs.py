"""The corpus builder's inputs: the files under ``--input``, cut into pieces that tasks read in
parallel (a large JSONL file by byte ranges, a large Parquet file by row groups), and the records of
one piece, streamed, each with its origin ("file, line N" / "file, row N") as the whole file counts.

A JSONL piece [start, end) owns the lines whose first byte lies in it: it skips the line it starts
inside and reads on past ``end`` to the end of its last line. Line numbers of a piece that starts
inside a file come from a first, cheap round (``count_newlines``: one read of the bytes, no
parsing), so problems name the same line whatever the cut.
"""

from __future__ import annotations

import io
import json
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage

PIECE_BYTES = 128 << 20   # an input file larger than this is read by several tasks
READ_BUFFER = 1 << 20


def input_files(uri: str, endpoint: str | None) -> list[dict]:
    """[{path, bytes}] of the .jsonl / .parquet input (a file or a folder), sorted; clear errors."""
    fs, path = storage.resolve(uri, endpoint)
    info = fs.get_file_info(path)
    if info.type.name == "NotFound":
        raise ValueError(f"--input: no such file or folder: {uri}")
    if info.type.name == "File":
        return [{"path": path, "bytes": info.size}]
    selector = pa.fs.FileSelector(path, recursive=True)
    found = [{"path": f.path, "bytes": f.size} for f in fs.get_file_info(selector)
             if f.type.name == "File" and f.path.endswith((".jsonl", ".parquet"))]
    if not found:
        raise ValueError(f"--input: no .jsonl or .parquet files at {uri}")
    return sorted(found, key=lambda f: f["path"])


def pieces(fs, files: list[dict], piece_bytes: int = PIECE_BYTES) -> list[dict]:
    """The tasks' work: {index, path, bytes, file, start, end} (JSONL byte ranges; ``end`` None = to
    the end) or {..., row_groups, first_row} (Parquet). Only Parquet footers are read here."""
    out: list[dict] = []
    for number, f in enumerate(files):
        if f["bytes"] <= piece_bytes:
            out.append({"path": f["path"], "bytes": f["bytes"], "file": number})
        elif f["path"].endswith(".parquet"):
            try:
                meta = pq.ParquetFile(fs.open_input_file(f["path"])).metadata
            except (OSError, ValueError, pa.ArrowException):
                out.append({"path": f["path"], "bytes": f["bytes"], "file": number})  # its task reports it
                continue
            first, row, size, start_row = 0, 0, 0, 0
            for group in range(meta.num_row_groups):
                size += meta.row_group(group).total_byte_size
                row += meta.row_group(group).num_rows
                if size >= piece_bytes or group == meta.num_row_groups - 1:
                    out.append({"path": f["path"], "bytes": size, "file": number,
                                "row_groups": [first, group + 1], "first_row": start_row})
                    first, size, start_row = group + 1, 0, row
        else:
            for start in range(0, f["bytes"], piece_bytes):
                end = start + piece_bytes
                out.append({"path": f["path"], "bytes": min(end, f["bytes"]) - start, "file": number,
                            "start": start, "end": None if end >= f["bytes"] else end})
    return [{**p, "index": i} for i, p in enumerate(out)]


def count_newlines(fs, piece: dict) -> int:
    """Newlines in [start - 1, end - 1) of a JSONL piece ([0, end - 1) for the first): summed over
    the pieces before one, they give its first line's number (see ``first_lines``)."""
    begin = max(0, piece["start"] - 1)
    stop = (piece["end"] or piece["start"] + piece["bytes"]) - 1
    count = 0
    with fs.open_input_file(piece["path"]) as handle:
        handle.seek(begin)
        left = stop - begin
        while left > 0:
            chunk = handle.read(min(READ_BUFFER * 8, left))
            if not chunk:
                break
            count += chunk.count(b"\n")
            left -= len(chunk)
    return count


def first_lines(split: list[dict], counts: dict[int, int]) -> dict[int, int]:
    """Piece index -> the number of its first line, for the byte-range pieces of split files."""
    numbers: dict[int, int] = {}
    seen: dict[int, int] = {}  # file -> newlines before the current piece's start - 1
    for piece in sorted(split, key=lambda p: (p["file"], p["start"])):
        before = seen.get(piece["file"], 0)
        numbers[piece["index"]] = 1 if piece["start"] == 0 else before + 2
        seen[piece["file"]] = before + counts.get(piece["index"], 0)  # the file's last piece: not counted
    return numbers


def records_of(fs, piece: dict) -> Iterator[tuple[str, dict | None, str | None]]:
    """(origin, record, problem) for each record of one piece, streaming. Lines that are not JSON
    objects, or not UTF-8, are problems, never a traceback."""
    path = piece["path"]
    if path.endswith(".parquet"):
        yield from _parquet_records(fs, piece)
        return
    start, end = piece.get("start", 0), piece.get("end")
    with fs.open_input_file(path) as handle:
        if start:
            handle.seek(start - 1)
        reader = io.BufferedReader(handle, READ_BUFFER)
        position = start
        if start:
            skipped = reader.readline()  # the line this piece starts inside belongs to the one before
            position = start - 1 + len(skipped)
        number = piece.get("first_line", 1) - 1
        while end is None or position < end:
            raw = reader.readline()
            if not raw:
                break
            position += len(raw)
            number += 1
            origin = f"{path}, line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield origin, None, f"{origin}: not UTF-8 text (byte {err.start + 1} of the line)"
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                yield origin, None, f"{origin}: not JSON ({err.msg}, column {err.colno})"
                continue
            except RecursionError:
                yield origin, None, f"{origin}: nested too deeply"
                continue
            if not isinstance(record, dict):
                yield origin, None, f"{origin}: a JSON {type(record).__name__}, not an object of fields"
                continue
            yield origin, record, None


def _parquet_records(fs, piece: dict, batch_size: int = 2048) -> Iterator[tuple[str, dict | None, str | None]]:
    path = piece["path"]
    try:
        parquet = pq.ParquetFile(fs.open_input_file(path))
        groups = piece.get("row_groups")
        number = piece.get("first_row", 0)
        batches = parquet.iter_batches(batch_size=batch_size,
                                       row_groups=list(range(*groups)) if groups else None)
        for batch in batches:
            for record in batch.to_pylist():
                number += 1
                yield f"{path}, row {number}", record, None
    except (OSError, ValueError, pa.ArrowException) as err:
        yield path, None, f"{path}: not a readable Parquet file ({str(err)[:200]})"

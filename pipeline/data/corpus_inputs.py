"""The corpus builder's inputs: the files under ``--input``, cut into pieces that tasks read in
parallel (a large JSONL file by byte ranges, a large Parquet file by row groups), and the records of
one piece, streamed in chunks, each record with its origin ("file, line N" / "file, row N") as the
whole file counts.

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


class Chunk:
    """Up to ``size`` records of one piece as read: JSONL ``lines`` [(line number, raw bytes)] (blank
    lines left out), or a Parquet ``table`` whose first row is row ``first_row`` + 1 of its file, or
    a ``problem`` (an unreadable file). ``records()`` parses them one by one with their origins."""

    def __init__(self, path: str, lines=None, table: pa.Table | None = None, first_row: int = 0,
                 problem: str | None = None):
        self.path, self.lines, self.table, self.first_row, self.problem = path, lines, table, first_row, problem

    def origins(self) -> list[str]:
        if self.lines is not None:
            return [f"{self.path}, line {number}" for number, _ in self.lines]
        return [f"{self.path}, row {self.first_row + i + 1}" for i in range(self.table.num_rows if self.table else 0)]

    def records(self) -> Iterator[tuple[str, dict | None, str | None]]:
        """(origin, record, problem) per record. Lines that are not JSON objects, or not UTF-8, are
        problems, never a traceback."""
        if self.problem:
            yield self.path, None, self.problem
        elif self.lines is not None:
            for (number, raw) in self.lines:
                found = parse_line(f"{self.path}, line {number}", raw)
                if found is not None:
                    yield found
        else:
            yield from zip(self.origins(), self.table.to_pylist(), [None] * self.table.num_rows)


def parse_line(origin: str, raw: bytes) -> tuple[str, dict | None, str | None] | None:
    """One JSONL line -> (origin, record, problem); None for a blank line."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return origin, None, f"{origin}: not UTF-8 text (byte {err.start + 1} of the line)"
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        return origin, None, f"{origin}: not JSON ({err.msg}, column {err.colno})"
    except RecursionError:
        return origin, None, f"{origin}: nested too deeply"
    if not isinstance(record, dict):
        return origin, None, f"{origin}: a JSON {type(record).__name__}, not an object of fields"
    return origin, record, None


def chunks_of(fs, piece: dict, size: int) -> Iterator[Chunk]:
    """The records of one piece, streaming, ``size`` at a time (see ``Chunk``)."""
    path = piece["path"]
    if path.endswith(".parquet"):
        yield from _parquet_chunks(fs, piece, size)
        return
    start, end = piece.get("start", 0), piece.get("end")
    lines: list[tuple[int, bytes]] = []
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
            if raw.isspace():
                continue  # blank (ASCII whitespace); other blank-looking lines go to parse_line
            lines.append((number, raw.rstrip(b"\r\n")))
            if len(lines) == size:
                yield Chunk(path, lines=lines)
                lines = []
    if lines:
        yield Chunk(path, lines=lines)


def _parquet_chunks(fs, piece: dict, size: int) -> Iterator[Chunk]:
    path = piece["path"]
    try:
        parquet = pq.ParquetFile(fs.open_input_file(path))
        groups = piece.get("row_groups")
        number = piece.get("first_row", 0)
        for batch in parquet.iter_batches(batch_size=size, row_groups=list(range(*groups)) if groups else None):
            yield Chunk(path, table=pa.Table.from_batches([batch]), first_row=number)
            number += batch.num_rows
    except (OSError, ValueError, pa.ArrowException) as err:
        yield Chunk(path, problem=f"{path}: not a readable Parquet file ({str(err)[:200]})")

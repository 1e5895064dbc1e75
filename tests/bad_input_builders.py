"""How each bad-input case of tests/test_bad_input.py is made and run: a config, a file or a record
built under the case's temp folder, handed to the code every entry point uses, and what the user is
told returned as text."""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml

from helpers import corpus_rows
from pipeline.config import DistillConfig
from pipeline.cli import load_experiments
from pipeline.data.corpus import RowChecker
from wand.models import get_spec


ROOT = Path(__file__).resolve().parents[1]
INPUT = "input"  # what a case hands the pipeline (a config file, a weights file) goes here


@dataclass(frozen=True)
class Case:
    kind: str  # the docs' table row
    run: Callable[[Path], str]  # returns what the user is told (an error message or a row's reason)
    expect: str  # a regex the message must match: it names the row, field or path


def row_reason(change: Callable[[dict], dict], model: str = "cosyvoice2") -> Callable[[Path], str]:
    def run(_tmp: Path) -> str:
        spec = get_spec(model, "tiny")
        row = change(dict(corpus_rows(spec, 1, seed=3)[0]))
        return RowChecker(spec).reason(row) or "accepted"
    return run


def speech(model: str = "cosyvoice2") -> int:
    return int(get_spec(model, "tiny").target_ids()[0])


def text_token(model: str = "cosyvoice2") -> int:
    spec = get_spec(model, "tiny")
    return min(set(range(spec.vocab_size)) - set(spec.target_ids().tolist()))


def config_error(**fields) -> Callable[[Path], str]:
    """An experiment config with ``fields`` changed, loaded the way every entry point loads one."""
    def run(tmp: Path) -> str:
        values = {"experiment": "e", "model": "cosyvoice2", "model_size": "tiny", "corpus": "c", "shards": "s",
                  "storage": "st", "evaluate": {"enabled": False}, **fields}
        (tmp / INPUT).mkdir(exist_ok=True)
        (tmp / INPUT / "exp.yaml").write_text(yaml.safe_dump(values))
        return cli_error("--config", str(tmp / INPUT / "exp.yaml"))(tmp)
    return run


def cli_error(*argv: str) -> Callable[[Path], str]:
    def run(tmp: Path) -> str:
        import contextlib
        import io

        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                load_experiments(DistillConfig, argparse.ArgumentParser(prog="distill.py"),
                                 [*argv, "--root", str(tmp)])
        except SystemExit as exit_:
            return f"exit {exit_.code}: {stderr.getvalue()}"
        except ValueError as err:
            return str(err)
        return "accepted"
    return run


def teacher_error(model: str, source: Callable[[Path], str]) -> Callable[[Path], str]:
    def run(tmp: Path) -> str:
        from wand.models.weights import teacher_weights

        try:
            teacher_weights(get_spec(model, "mini"), source(tmp), 0, None)
        except ValueError as err:
            return str(err)
        return "accepted"
    return run


class Payload:
    """Unpickling this would run a shell command that leaves a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def pickled_code(tmp: Path) -> str:
    (tmp / INPUT).mkdir()
    torch.save({"model": Payload(tmp / "executed")}, tmp / INPUT / "llm.pt")
    return str(tmp / INPUT)


SECRET = "hunter2pw"  # every case's output is checked for it: no input ever makes us print a credential


def config_file(content: str | bytes, directory: bool = False) -> Callable[[Path], str]:
    """A config file of raw ``content`` (or a folder where the file should be), loaded the way every
    entry point loads one."""
    def run(tmp: Path) -> str:
        (tmp / INPUT).mkdir(exist_ok=True)
        path = tmp / INPUT / "exp.yaml"
        if directory:
            path.mkdir()
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return cli_error("--config", str(path))(tmp)
    return run


def with_env(name: str, value: str, run: Callable[[Path], str]) -> Callable[[Path], str]:
    def wrapped(tmp: Path) -> str:
        saved = os.environ.get(name)
        os.environ[name] = value
        try:
            return run(tmp)
        finally:
            if saved is None:
                os.environ.pop(name)
            else:
                os.environ[name] = saved
    return wrapped


def make_corpus_error(content: str | bytes, model: str = "cosyvoice2") -> Callable[[Path], str]:
    """``python -m jobs.make_corpus`` on a JSONL file of ``content``, as a user runs it (its own
    process and local Ray, a clean environment): the exit and stderr."""
    def run(tmp: Path) -> str:
        import subprocess
        import sys

        (tmp / INPUT).mkdir(exist_ok=True)
        (tmp / INPUT / "records.jsonl").write_bytes(content if isinstance(content, bytes) else content.encode())
        out = subprocess.run([sys.executable, "-m", "jobs.make_corpus", "--model", model, "--size", "tiny",
                              "--input", str(tmp / INPUT / "records.jsonl"), "--output", str(tmp / "corpus")],
                             cwd=ROOT, capture_output=True, text=True, timeout=300,
                             env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp),
                                  "LANG": "C.UTF-8"})
        # What the user is told: the lines after the job's and Ray's log lines (timestamped).
        lines = out.stderr.splitlines()
        logged = [i for i, line in enumerate(lines) if re.match(r"^(\x1b\[\d+m)?\(?\S*\s*\d{4}-\d\d-\d\d \d\d:", line)]
        return f"exit {out.returncode}: " + "\n".join(lines[logged[-1] + 1 if logged else 0:])
    return run


def record(**fields) -> str:
    import json

    return json.dumps({"id": "r1", "text_ids": [1, 2], "target_codes": [3, 4], **fields})


def good_manifest(tmp: Path) -> dict:
    return {"format": "wand-teacher-topk/1", "teacher": {"preset": "cosyvoice2", "size": "tiny", "source": None,
                                                         "seed": 0, "fingerprint": "0" * 64},
            "k": 4, "temperature": 1.0, "rows": 3, "shards": [{"file": "shard-00000.parquet", "rows": 3, "sha256": "a" * 64}]}


def manifest_error(change: Callable[[dict], dict] | None = None, raw: bytes | None = None) -> Callable[[Path], str]:
    """A shard folder whose manifest.json is ``change(a good one)`` (or ``raw`` bytes), loaded the way
    training and the evals load it."""
    def run(tmp: Path) -> str:
        import json

        from pipeline.data.shards import load_manifest

        folder = tmp / INPUT / "shards"
        folder.mkdir(parents=True)
        data = raw if raw is not None else json.dumps(change(good_manifest(tmp))).encode()
        (folder / "manifest.json").write_bytes(data)
        try:
            load_manifest(str(folder))
        except ValueError as err:
            return str(err)
        return "accepted"
    return run


def shard_error(change: Callable[[dict], dict]) -> Callable[[Path], str]:
    """A shard whose contents are ``change(good columns)``, its sha256 recorded afresh (so only the
    content check can catch it), read the way a training worker reads it."""
    def run(tmp: Path) -> str:
        import hashlib

        import pyarrow as pa
        import pyarrow.parquet as pq

        from pipeline.data.shards import read_shard, ShardCorrupt
        from pipeline.storage import resolve

        spec = get_spec("cosyvoice2", "tiny")
        row = corpus_rows(spec, 1, seed=3)[0]
        generated = len(row["input_ids"]) - row["prefix_length"]
        k = 4
        columns = {"id": [row["id"]], "input_ids": [row["input_ids"]], "prefix_length": [row["prefix_length"]],
                   "topk_indices": [[[0, 1, 2, 3]] * generated], "topk_logprobs": [[[-1.0, -2.0, -3.0, -4.0]] * generated],
                   "rest_logprob": [[-5.0] * generated]}
        columns = change(columns)
        table = pa.table({
            "id": pa.array(columns["id"]), "input_ids": pa.array(columns["input_ids"], type=pa.list_(pa.int32())),
            "prefix_length": pa.array(columns["prefix_length"], type=pa.int32()),
            "topk_indices": pa.array(columns["topk_indices"], type=pa.list_(pa.list_(pa.uint16(), k))),
            "topk_logprobs": pa.array(columns["topk_logprobs"], type=pa.list_(pa.list_(pa.float32(), k))),
            "rest_logprob": pa.array(columns["rest_logprob"], type=pa.list_(pa.float32()))})
        (tmp / INPUT).mkdir()
        path = tmp / INPUT / "shard-00000.parquet"
        pq.write_table(table, path)
        fs, local = resolve(str(path))
        try:
            read_shard(fs, local, hashlib.sha256(path.read_bytes()).hexdigest(),
                       (spec.vocab_size, len(spec.target_ids())))
        except ShardCorrupt as err:
            return str(err)
        return "accepted"
    return run


def checkpoint_error(files: dict) -> Callable[[Path], str]:
    """A checkpoint folder whose checksum list is ``files``, checked the way a resume checks it."""
    def run(tmp: Path) -> str:
        import json

        from pipeline.train import checkpoints
        from pipeline.storage import resolve

        folder = tmp / INPUT / "checkpoint_000001"
        (folder / "checksums").mkdir(parents=True)
        (folder / "state.json").write_text("{}")
        (folder / "checksums" / "rank-0.json").write_text(json.dumps(files))
        fs, path = resolve(str(folder))
        return checkpoints.problem(fs, path, 1) or "accepted"
    return run


def spark_teacher(change: Callable[[dict], dict]) -> Callable[[Path], str]:
    """A copy of the committed Spark teacher whose safetensors holds ``change(its tensors)``."""
    def source(tmp: Path) -> str:
        import shutil

        from safetensors.torch import load_file, save_file

        shutil.copytree(ROOT / "teachers" / "sparktts", tmp / INPUT / "spark")
        weights = tmp / INPUT / "spark" / "model.safetensors"
        save_file(change(load_file(str(weights))), str(weights), metadata={"format": "pt"})
        return str(tmp / INPUT / "spark")
    return source


def truncated(name: str, family: str) -> Callable[[Path], str]:
    def source(tmp: Path) -> str:
        import shutil

        shutil.copytree(ROOT / "teachers" / family, tmp / INPUT / family)
        path = tmp / INPUT / family / name
        path.write_bytes(path.read_bytes()[:4096])
        return str(tmp / INPUT / family)
    return source


def partial_stage_checkpoint(tmp: Path) -> str:
    from wand.models.weights import load_tied

    spec = get_spec("cosyvoice2", "tiny")
    state = spec.build().state_dict()
    first = sorted(state)[0]
    try:
        load_tied(spec.build(), {first: state[first]}, str(tmp / "checkpoint_000001"), "stage 1's checkpoint")
    except ValueError as err:
        return str(err)
    return "accepted"



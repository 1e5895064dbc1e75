"""The teacher top-k precompute as a Ray Data stage: read the corpus (Parquet or JSONL, local or
s3://), check every row, assign rows to shards by id, run the frozen teacher in actors and write
each shard whole with its sidecar; ``manifest.json`` last. Rerunning resumes: finished shards whose
settings, corpus fingerprint and teacher files match are kept.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

import wand
from wand.batch import collate
from wand.models.weights import fingerprint, teacher_weights
from wand.topk import sparse_teacher_targets

from pipeline import resources, storage
from pipeline.config import PrecomputeConfig
from pipeline.data.corpus_check import (assign_shards, check_corpus, CorpusCheck, FINGERPRINT_KIND,
                                        legacy_fingerprint, SHOWN_BAD)
from pipeline.data.corpus_io import corpus_files
from pipeline.data.shards import build_shard_table, FORMAT, index_type, MANIFEST, shard_metadata, shard_name

log = logging.getLogger("wand.precompute")


RUN_FILE = "_run.json"


class ShardFault(RuntimeError):
    """Raised on purpose by the fault-injection hook (tests)."""


def load_teacher(config: PrecomputeConfig, device: torch.device):
    spec = config.spec()
    model = teacher_weights(spec, config.teacher_source, config.teacher_seed, config.s3_endpoint)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = model.to(device=device, dtype=dtype).eval()
    return wand.enable_wand(model, None), spec  # full attention: the teacher


def weights_fingerprint(model: torch.nn.Module) -> str:
    return fingerprint(model.state_dict())


class TeacherTopK:
    """map_groups callable: one group = one shard; computes its top-k and writes it."""

    def __init__(self, config_json: str, fault: str | None = None):
        self.config = PrecomputeConfig.model_validate_json(config_json)
        self.fault = fault
        use_gpu = self.config.num_gpus_per_actor > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.model, self.spec = load_teacher(self.config, self.device)
        self.fingerprint = weights_fingerprint(self.model)
        self.target_ids = self.spec.target_ids().to(self.device)
        self.fs, self.root = storage.resolve(self.config.shards, self.config.s3_endpoint)

    def __call__(self, batch: pa.Table) -> pa.Table:
        shard = int(batch.column("shard")[0].as_py())
        rows = batch.drop_columns([c for c in ("shard", "path") if c in batch.column_names]).to_pylist()
        rows.sort(key=lambda r: r["id"])
        # Two identical copies of one id in one file both pass assign_shards: the shard holds it once.
        rows = [r for i, r in enumerate(rows) if i == 0 or r["id"] != rows[i - 1]["id"]]
        maybe_fail(self.fault, shard)
        results = self.compute(rows)
        table = build_shard_table(rows, results, self.config.k, self.config.value_dtype, len(self.target_ids),
                                  shard_metadata(self.config, len(self.target_ids)))
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue()
        path = storage.join(self.root, shard_name(shard))
        storage.write_bytes(self.fs, path, data)
        sidecar = dict(file=shard_name(shard), shard=shard, rows=len(rows), sha256=hashlib.sha256(data).hexdigest(),
                       first_id=rows[0]["id"], last_id=rows[-1]["id"], teacher_fingerprint=self.fingerprint,
                       generated_tokens=int(sum(len(r["input_ids"]) - r["prefix_length"] for r in rows)))
        # The sidecar is written last: its presence means the shard file is complete.
        storage.write_json(self.fs, path.replace(".parquet", ".json"), sidecar)
        return pa.table({k: [v] for k, v in sidecar.items()})

    def compute(self, rows: list[dict]) -> list[tuple[torch.Tensor, np.ndarray, np.ndarray]]:
        return topk_of_rows(self.spec, self.model, rows, self.config.k, self.config.temperature,
                            self.config.max_tokens_per_batch, self.device)


@torch.no_grad()
def topk_of_rows(spec, model, rows: list[dict], k: int, temperature: float, max_tokens_per_batch: int,
                 device: torch.device) -> list[tuple[torch.Tensor, np.ndarray, np.ndarray]]:
    """Per row, the teacher's top-k at its generated positions (values, compact indices into the
    target ids, rest): teacher-forced forwards in length-sorted, token-budget batches."""
    target_ids = spec.target_ids().to(device)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    results: list = [None] * len(rows)
    batch: list[int] = []
    for i in order + [None]:
        longest = max([len(rows[j]["input_ids"]) for j in batch] + ([len(rows[i]["input_ids"])] if i is not None else [0]))
        if batch and (i is None or longest * (len(batch) + 1) > max_tokens_per_batch):
            collated = collate(spec, [rows[j] for j in batch], device)
            # window=None: the teacher with full attention, whatever window its wrapper holds.
            logits = model(**collated.model_inputs(), window=None).logits[collated.batch_index, collated.positions]
            values, index, rest = sparse_teacher_targets(logits, target_ids, k, temperature)
            for j, v, x, r in zip(batch, collated.per_sample(values), collated.per_sample(index), collated.per_sample(rest)):
                results[j] = (v.cpu(), x.cpu().numpy(), r.cpu().numpy().astype(np.float32))
            batch = []
        if i is not None:
            batch.append(i)
    return results


# Fault injection for tests (never a config field): "SHARD:MARKER_FILE" fails that shard once (the
# marker file records that it did). Read by the driver and handed to the actors.
FAULT_ENV = "WAND_TEST_SHARD_FAULT"


def maybe_fail(fault: str | None, shard: int) -> None:
    if not fault:
        return
    target, marker = fault.split(":", 1)
    if int(target) == shard and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write("failed once\n")
        raise ShardFault(f"injected failure on shard {shard} ({FAULT_ENV})")


# ----------------------------------------------------------------------------- driver side
def read_corpus(config: PrecomputeConfig):
    import ray.data

    fs, _ = storage.resolve(config.corpus, config.s3_endpoint)
    files = corpus_files(config.corpus, config.s3_endpoint)
    if not files:
        raise ValueError(f"input: no .parquet or .jsonl files under {config.corpus}")
    kinds = {f.endswith(".parquet") for f in files}
    if len(kinds) > 1:
        raise ValueError(f"input: mixes Parquet and JSONL files under {config.corpus}; use one format")
    reader = ray.data.read_parquet if kinds == {True} else ray.data.read_json
    # One read task per file keeps the `path` column exact.
    ds = reader(files, filesystem=fs, include_paths=True, num_cpus=config.read_num_cpus)
    return ds, files


def bad_rows_error(check: CorpusCheck) -> str:
    lines = [f"  {r['path']}: id {r['id']!r}: {r['reason']}" for r in check.bad[:SHOWN_BAD]]
    more = f"\n  ... and {check.bad_count - SHOWN_BAD} more" if check.bad_count > SHOWN_BAD else ""
    return (f"{check.bad_count} bad row(s) in the corpus; nothing was written. Fix them, or set "
            "on_bad_rows='quarantine' to write them to errors/ and go on:\n" + "\n".join(lines) + more)


def run_precompute(config: PrecomputeConfig) -> dict:
    """Run (or resume) the stage; return the manifest. Ray must be initialised (``ray.init``)."""
    storage.require_credentials(config.corpus, config.shards, config.teacher_source)
    spec = config.spec()
    fs, root = storage.resolve(config.shards, config.s3_endpoint)
    ds, files = read_corpus(config)
    check = check_corpus(files, config.corpus, config.s3_endpoint, spec, config.rows_per_shard,
                         config.on_bad_rows == "quarantine", config.read_num_cpus)
    if check.bad_count and config.on_bad_rows == "fail":
        raise ValueError(bad_rows_error(check))
    if not check.good:
        raise ValueError(f"input: no valid rows in {config.corpus}")

    run = {"settings": config.resume_key(), "input_fingerprint": check.fingerprint,
           "input_fingerprint_kind": FINGERPRINT_KIND, "format": FORMAT,
           "teacher_files": teacher_files_fingerprint(config.teacher_source, config.s3_endpoint)}
    run_path = storage.join(root, RUN_FILE)
    if storage.exists(fs, run_path):
        previous = storage.read_json(fs, run_path)
        if "teacher_files" not in previous:  # written before teacher files were fingerprinted
            log.warning("precompute: %s predates teacher-file fingerprints; recording them now", run_path)
            previous["teacher_files"] = run["teacher_files"]
            storage.write_json(fs, run_path, previous)
        if "input_fingerprint_kind" not in previous:  # written before the order-independent fingerprint
            log.info("precompute: %s records the input's fingerprint the earlier way; computing it so", run_path)
            run.pop("input_fingerprint_kind")
            run["input_fingerprint"] = legacy_fingerprint(files, config.corpus, config.s3_endpoint, spec,
                                                          config.read_num_cpus)
        if previous != run:
            raise ValueError(
                f"output {config.shards} holds shards of another run (settings, input or teacher weights differ: "
                f"{_diff(previous, run)}); use a new output folder"
            )
    else:
        storage.write_json(fs, run_path, run)

    n_shards = check.shards
    done = {s for s in range(n_shards) if _shard_done(fs, root, s)}
    pending = n_shards - len(done)
    if pending:
        log.info("precompute: %d rows in %d shards, %d done, %d to compute", check.good, n_shards, len(done), pending)
    else:
        log.info("precompute: matching shards found in %s (%d shards; settings, input and teacher files "
                 "unchanged); nothing to compute", config.shards, n_shards)
    if pending:
        import ray

        # Plain functions run as tasks on pooled workers (no new process per run); only the
        # teacher needs an actor.
        assigned = ds.map_batches(assign_shards, fn_kwargs={"plan": ray.put(check.plan(done, files))},
                                  batch_format="pyarrow", num_cpus=config.read_num_cpus)
        # One shuffle partition per pending shard (bounded): Ray's default of 200 is for big data.
        partitions = max(1, min(pending, 64))
        request = resources.precompute(config)  # what preflight checked and cluster/ is sized for
        summaries = assigned.groupby("shard", num_partitions=partitions).map_groups(
            TeacherTopK, fn_constructor_args=(config.model_dump_json(), os.environ.get(FAULT_ENV)), batch_format="pyarrow",
            concurrency=request.count, num_cpus=request.cpus, num_gpus=request.gpus, **request.selector(),
        ).take_all()
        computed = {int(s["shard"]) for s in summaries}
        missing = set(range(n_shards)) - done - computed
        if missing:
            raise RuntimeError(f"precompute: shards {sorted(missing)} were not produced")

    if check.bad:
        _write_bad_rows(fs, root, check.bad)
    sidecars = [storage.read_json(fs, storage.join(root, shard_name(s).replace(".parquet", ".json")))
                for s in range(n_shards)]
    fingerprints = {s["teacher_fingerprint"] for s in sidecars}
    if len(fingerprints) != 1:
        raise RuntimeError(f"precompute: shards were computed by different teacher weights: {sorted(fingerprints)}")
    manifest = {
        "format": FORMAT,
        "teacher": {"preset": config.model, "size": config.model_size, "source": config.teacher_source,
                    "seed": None if config.teacher_source else config.teacher_seed,
                    "fingerprint": fingerprints.pop()},
        "k": config.k, "temperature": config.temperature, "value_dtype": config.value_dtype,
        "index_dtype": str(index_type(len(spec.target_ids()))), "target_vocab_size": len(spec.target_ids()),
        "input": {"uri": config.corpus, "files": len(files), "fingerprint": run["input_fingerprint"]},
        "rows": check.good, "rows_per_shard": config.rows_per_shard,
        "generated_tokens": sum(s["generated_tokens"] for s in sidecars),
        "shards": [{k: s[k] for k in ("file", "rows", "sha256", "first_id", "last_id")} for s in sidecars],
        "bad_rows": {"mode": config.on_bad_rows, "count": check.bad_count,
                     "file": "errors/bad_rows.parquet" if check.bad else None},
    }
    storage.write_json(fs, storage.join(root, MANIFEST), manifest)
    return manifest


def _shard_done(fs, root: str, shard: int) -> bool:
    sidecar = storage.join(root, shard_name(shard).replace(".parquet", ".json"))
    path = storage.join(root, shard_name(shard))
    if not (storage.exists(fs, sidecar) and storage.exists(fs, path)):
        return False
    return storage.read_json(fs, sidecar)["sha256"] == storage.sha256_file(fs, path)


def _write_bad_rows(fs, root: str, bad: list[dict]) -> None:
    table = pa.table({"id": [r["id"] for r in bad], "path": [r["path"] for r in bad],
                      "reason": [r["reason"] for r in bad]})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    storage.write_bytes(fs, storage.join(root, "errors", "bad_rows.parquet"), sink.getvalue())


def _diff(a: dict, b: dict, prefix: str = "") -> str:
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            sub = _diff(x, y, f"{prefix}{key}.")
            if sub:
                out.append(sub)
        elif x != y:
            out.append(f"{prefix}{key}: {x!r} -> {y!r}")
    return ", ".join(out)


def teacher_files_fingerprint(source: str | None, endpoint: str | None = None) -> str | None:
    """What identifies the teacher's weight files without loading the model, so that new weights at
    the same path are not mistaken for the ones the shards were computed with: sha256 over every
    file's relative name and content (local), or name, size and modification time (S3). None for a
    seeded random teacher (its seed is in the settings) or a hub id (pinned by its revision)."""
    if source is None:
        return None
    if not storage.is_remote(source) and not os.path.exists(source):
        return None  # a hub id
    fs, root = storage.resolve(source, endpoint)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        infos = [info]
    else:
        infos = [i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if i.type == pafs.FileType.File]
    digest = hashlib.sha256()
    for item in sorted(infos, key=lambda i: i.path):
        digest.update(os.path.relpath(item.path, root).encode())
        if storage.is_remote(source):
            digest.update(f"{item.size}:{item.mtime_ns}".encode())
            continue
        with open(item.path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()

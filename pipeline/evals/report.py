"""The per-model results table printed by jobs/distill.py and jobs/compare.py, and its rows read back
from an MLflow server."""

from __future__ import annotations

__all__ = ["results_table", "COLUMNS", "ui_lines", "registry_lines", "rows_from_server"]


def _fmt(value, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "bytes":
        return f"{value / 1024:,.0f} KiB" if value < 1024**2 else f"{value / 1024**2:,.1f} MiB"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "ratio":
        return f"{value:.2f}"
    return f"{value:.3f}" if value == 0 or abs(value) >= 0.001 else f"{value:.1e}"


# (header, metric keys, kind): one cell may show two metrics as "a / b".
COLUMNS = (
    ("KV @60s full / WAND", ("kv_full_bytes_60s", "kv_wand_bytes_60s"), "bytes"),
    ("KV saved @60s", ("kv_reduction_60s",), "pct"),
    ("step time late/early full / WAND", ("latency_full_ratio_late_early", "latency_wand_ratio_late_early"), "ratio"),
    ("attn FLOPs x @60s (theory)", ("attn_flops_speedup_60s",), "ratio"),
    ("top-1 agree near / mid / far", ("top1_agreement_near", "top1_agreement_mid", "top1_agreement_far"), "num"),
    ("KL far", ("kl_far",), "num"),
    ("PER teacher / WAND (synthetic)", ("per_teacher", "per_student"), "num"),
    ("speaker acc. teacher / WAND", ("speaker_accuracy_teacher", "speaker_accuracy_student"), "num"),
)


def results_table(rows: list[dict]) -> str:
    """Markdown table; each row has ``experiment``, ``model``, ``evals`` (flat metrics) and
    optionally ``final_loss``, ``parent_run_id`` and ``tracking_uri``."""
    header = ["experiment", "model", *(c[0] for c in COLUMNS), "final loss", "MLflow run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        evals = row.get("evals") or {}
        cells = [row["experiment"], row["model"]]
        for _, keys, kind in COLUMNS:
            if kind == "bytes" and any(evals.get(k) is None for k in keys):
                # Beyond the model's own length limit (IndexTTS): the analytic figure, marked.
                analytic = [evals.get(k.replace("_bytes_", "_bytes_analytic_")) for k in keys]
                cells.append(" / ".join(_fmt(v, kind) for v in analytic) + " (analytic)")
                continue
            cells.append(" / ".join(_fmt(evals.get(k), kind) for k in keys))
        cells.append(_fmt(row.get("final_loss"), "num"))
        run = row.get("parent_run_id")
        uri = row.get("tracking_uri") or ""
        cells.append(f"{uri.rstrip('/')}/#/experiments/{row['experiment_id']}/runs/{run}?workflowType=machine_learning"
                     if run and uri.startswith("http") and row.get("experiment_id") else (run or "-"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ui_lines(rows: list[dict]) -> str:
    """The MLflow UI links of the rows' experiment and the Compare view of their parent runs."""
    from pipeline.tracking import ui_links

    tracked = [r for r in rows if r.get("parent_run_id") and str(r.get("tracking_uri") or "").startswith("http")
               and r.get("experiment_id")]
    if not tracked:
        return ""
    links = ui_links(tracked[0]["tracking_uri"], tracked[0]["experiment_id"], [r["parent_run_id"] for r in tracked])
    return (f"MLflow experiment:   {links['experiment']}\n"
            f"Compare the models:  {links['compare']}")


def registry_lines(rows: list[dict]) -> str:
    """Where each row's student is registered and the one line that loads it."""
    registered = [r for r in rows if r.get("registered_model")]
    if not registered:
        return ""
    lines = ["Registered students (load one: mlflow.pyfunc.load_model(URI) with MLFLOW_TRACKING_URI="
             f"{registered[0].get('tracking_uri') or '<server>'}; docs/tracking-and-evals.md):"]
    for row in registered:
        uri = row["registered_model"]
        if row.get("champion"):
            name = uri.removeprefix("models:/").rsplit("/", 1)[0]
            lines.append(f"  {row['experiment']:<18} models:/{name}@{row['champion']}  ({uri}: passed every gate)")
        else:
            lines.append(f"  {row['experiment']:<18} {uri}  (no alias: missed {row.get('missed') or 'a gate'})")
    return "\n".join(lines)


def rows_from_server(uri: str, experiment_name: str, match: str | None = None) -> list[dict]:
    """One row per finished parent run of ``experiment_name`` on the MLflow server at ``uri`` (the
    rows ``results_table`` prints); ``match`` keeps the experiments whose name contains it."""
    from mlflow import MlflowClient

    from pipeline.redaction import redact

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise SystemExit(f"no MLflow experiment '{experiment_name}' at {redact(uri)}")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`wand.role` = 'parent'",
                              order_by=["attributes.start_time ASC"], max_results=1000)
    rows = []
    for run in runs:
        name = run.data.tags.get("wand.experiment", run.info.run_name)
        if match and match not in name:
            continue
        rows.append({"experiment": name, "model": run.data.tags.get("wand.model", "?"), "evals": run.data.metrics,
                     "final_loss": run.data.metrics.get("final_loss"), "parent_run_id": run.info.run_id,
                     "tracking_uri": redact(uri), "experiment_id": experiment.experiment_id, "status": run.info.status,
                     "registered_model": run.data.tags.get("wand.registered_model"),
                     "champion": run.data.tags.get("wand.champion"), "missed": run.data.tags.get("wand.missed")})
    return rows

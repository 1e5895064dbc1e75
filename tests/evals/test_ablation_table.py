"""The results table's harness (benchmarks/ablation_table.py): files run apart merged as one table,
window-sweep variants by name."""

import pytest

from benchmarks.ablation_table import merged, variant_order, wand_variants
from pipeline.evals.ablation import VARIANTS, variant_named, wand_at


def result(model, variant, seed=None, window=32):
    return {"model": model, "variant": variant, "seed": seed, "window": window}


def saved(minutes, *results):
    return {"device": "cpu", "minutes": minutes, "teachers": {}, "results": list(results)}


def test_variants_by_name_include_wand_at_any_window():
    assert variant_named("control") is next(v for v in VARIANTS if v.name == "control")
    w64 = variant_named("wand_w64")
    assert (w64.name, w64.window, w64.window_start, w64.train, w64.attends, w64.kd_weight) == (
        "wand_w64", 64, 256, True, "prefix", 1.0)
    listed = variant_named("wand_w8")  # the stress row keeps its own entry, the same schedule as wand_at(8)
    assert (listed.window, listed.window_start) == (wand_at(8).window, wand_at(8).window_start)
    for bad in ("wand_w", "wand_w0", "wand_wx", "nope"):
        with pytest.raises(ValueError, match="unknown variant"):
            variant_named(bad)


def test_files_of_one_family_run_apart_merge_in_table_order():
    first = saved({"sparktts": 3.0, "cosyvoice2": 10.0}, result("sparktts", "teacher"),
                  result("cosyvoice2", "teacher"), result("cosyvoice2", "wand", 0), result("cosyvoice2", "wand", 1))
    later = saved({"cosyvoice2": 5.5}, result("cosyvoice2", "wand_w64", 0, 64), result("cosyvoice2", "sinks", 0),
                  result("cosyvoice2", "wand_w8", 0, 8))
    out = merged([later, first])
    assert [(r["model"], r["variant"], r["seed"]) for r in out["results"]] == [
        ("cosyvoice2", "teacher", None), ("cosyvoice2", "wand", 0), ("cosyvoice2", "wand", 1),
        ("cosyvoice2", "sinks", 0), ("cosyvoice2", "wand_w8", 0), ("cosyvoice2", "wand_w64", 0),
        ("sparktts", "teacher", None)]
    assert out["minutes"] == {"cosyvoice2": 15.5, "sparktts": 3.0}
    assert wand_variants(out["results"]) == ["wand", "wand_w8", "wand_w64"]
    assert variant_order("wand_w128") > variant_order("wand_w64") > variant_order("wand_w8")


def test_a_run_in_two_files_is_refused():
    with pytest.raises(SystemExit, match="more than once"):
        merged([saved({"cosyvoice2": 1.0}, result("cosyvoice2", "wand", 0)),
                saved({"cosyvoice2": 1.0}, result("cosyvoice2", "wand", 0))])

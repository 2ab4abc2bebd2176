import numpy as np
import pytest

from perf.bench import BASELINE_A, BASELINE_B, PerfConfig, run, select
from perf.report import class_report, pareto_front, per_class_table, plot_confusion
from serve.contract import Selection, UserError, read


@pytest.fixture(scope="module")
def results(tiny_variants, tmp_path_factory):
    out = tmp_path_factory.mktemp("perf")
    config = PerfConfig(
        variants=str(tiny_variants),
        output=str(out / "perf"),
        selected=str(out / "selected.json"),
        single_stream_queries=20,
        warmup=2,
        rounds=2,
        offline_batches=(8, 32),
        sweep_batches=(1, 8),
        sweep_lengths=(16, 64),
        sweep_seconds=0.01,
        max_eval_samples=64,
    )
    return run(config), out


@pytest.mark.slow
def test_report_has_every_entry_and_scenario(results):
    res, out = results
    names = [e["name"] for e in res["entries"]]
    assert names[:2] == [BASELINE_A, BASELINE_B]
    assert set(names[2:]) == {
        "onnx-fp32",
        "onnx-opt",
        "int8-dynamic",
        "int8-static",
        "pruned-fp32",
        "pruned-int8",
        "pruned-int8-static",
        "pruned-l3-fp32",
        "pruned-l3-int8",
    }
    for e in res["entries"]:
        ss = e["single_stream"]
        assert ss["queries"] == 20 and 0 < ss["p50_ms"] <= ss["p90_ms"] <= ss["p99_ms"]
        assert set(e["offline"]) == {"8", "32"} and all(v["sentences_per_s"] > 0 for v in e["offline"].values())
        assert set(e["sweep"]) == {"1x16", "1x64", "8x16", "8x64"}
        assert e["memory"]["peak_rss_mb"] > e["memory"]["after_imports_mb"] > 0
        assert 0 <= e["accuracy"]["accuracy"] <= 1 and e["bytes"] > 0
        assert e["speedup"]["single_stream_p50_vs_a"] > 0
    baseline_a = res["entries"][0]
    assert baseline_a["speedup"]["single_stream_p50_vs_a"] == 1.0
    assert res["machine"]["threads"] >= 1 and res["machine"]["flags"]
    assert res["int8_efficiency"]["achieved_int8_gops"] > 0
    assert (out / "perf" / "pareto.png").stat().st_size > 10_000
    assert "| entry |" in (out / "perf" / "report.md").read_text()


@pytest.mark.slow
def test_selection_file_names_a_valid_variant_within_budget(results):
    res, out = results
    selection = read(out / "selected.json", Selection)
    manifest, entry, record = selection.resolve()  # the manifest by sha256, the variant's files verified
    assert not selection.manifest.startswith("/")  # relative: the pair can move together
    chosen = next(e for e in res["entries"] if e["name"] == selection.variant)
    assert chosen["kind"] == "variant" and record.name == selection.variant
    assert chosen["accuracy"]["accuracy"] >= selection.rule["accuracy_floor"] - 1e-9
    assert entry.files["model.onnx"]["sha256"] == chosen["sha256"]
    assert selection.figures["single_stream"] == chosen["single_stream"]
    faster = [
        e
        for e in res["entries"]
        if e["kind"] == "variant"
        and e["name"] in selection.rule["eligible"]
        and e["single_stream"]["p50_ms"] < chosen["single_stream"]["p50_ms"]
    ]
    assert faster == []


def _entry(name, p50, acc, kind="variant"):
    return {"name": name, "kind": kind, "single_stream": {"p50_ms": p50}, "accuracy": {"accuracy": acc}}


def test_selection_respects_budget():
    entries = [
        _entry("onnx-fp32", 5.0, 0.80),
        _entry("int8-dynamic", 2.0, 0.795),
        _entry("pruned-int8", 1.0, 0.70),
        _entry(BASELINE_B, 0.5, 0.80, kind="baseline"),
    ]
    chosen = select(entries, 0.99)
    assert chosen["variant"] == "int8-dynamic" and chosen["budget_met"]
    assert chosen["eligible"] == ["onnx-fp32", "int8-dynamic"] and chosen["accuracy_floor"] == 0.792
    assert select(entries, 0.85)["variant"] == "pruned-int8"  # a looser budget admits the pruned variant
    assert select(entries, 1.0)["variant"] == "onnx-fp32"


def test_no_variant_meets_budget_serves_fp32_with_warning(capsys):
    entries = [_entry("onnx-fp32", 5.0, 0.80), _entry("int8-dynamic", 2.0, 0.70), _entry("pruned-int8", 1.0, 0.60)]
    chosen = select(entries, 0.99)
    assert chosen["variant"] == "onnx-fp32" and not chosen["budget_met"]
    assert "no variant keeps 99% of onnx-fp32's test accuracy" in capsys.readouterr().err
    with pytest.raises(UserError, match="onnx-fp32 is not among the valid variants"):
        select(entries[1:], 0.99)


def test_pareto_front():
    points = [("a", 10.0, 0.90), ("b", 2.0, 0.85), ("c", 3.0, 0.84), ("d", 1.0, 0.70), ("e", 2.0, 0.85)]
    assert pareto_front(points) == {"a", "b", "d", "e"}


def test_bad_config():
    with pytest.raises(UserError, match="--budget must lie in"):
        PerfConfig(budget=1.5)
    with pytest.raises(UserError, match="unknown scenario"):
        PerfConfig(scenarios=("server",))


def test_selection_sits_beside_the_report_unless_told_otherwise(tmp_path):
    assert PerfConfig(output=str(tmp_path / "mine" / "perf")).selection_path == tmp_path / "mine" / "selected.json"
    assert PerfConfig().selection_path.as_posix() == "artifacts/selected.json"  # the default pipeline's, as before
    assert PerfConfig(selected="x/s.json").selection_path.as_posix() == "x/s.json"


def test_per_class_report_and_confusion_plot(tmp_path):
    from train.scoring import score

    labels = ["Democratic", "Moderator", "Republican"]
    truth = ["Democratic"] * 3 + ["Moderator"] * 2 + ["Republican"] * 3
    preds = [0, 0, 2, 1, 1, 2, 2, 0]
    entry = {"name": "int8-dynamic", "accuracy": score(np.eye(3)[preds], truth, labels)}
    results = {"entries": [entry], "selection": {"variant": "int8-dynamic"}}
    assert per_class_table(results).splitlines() == [
        "| entry | Democratic | Moderator | Republican |",
        "|---|---|---|---|",
        "| int8-dynamic | 0.6667 | 1.0000 | 0.6667 |",
    ]
    text = class_report(entry["accuracy"])
    assert "| Moderator | 1.0000 | 1.0000 | 1.0000 | 2 |" in text
    assert "| Republican | 1 | 0 | 2 |" in text  # rows: true class; columns: predicted
    plot_confusion(results, tmp_path / "confusion.png")
    assert (tmp_path / "confusion.png").stat().st_size > 5_000

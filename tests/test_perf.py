import numpy as np
import pandas as pd
import pytest

from perf.bench import BASELINE_A, BASELINE_B, PerfConfig, load_eval_set, run, select
from perf.report import class_report, pareto_front, per_class_table, plot_confusion
from perf.stats import paired_difference
from serve.contract import Selection, UserError, read
from tests.conftest import CPU_RECIPES

EXTRA = [
    ("A triumph: warm, funny and moving.", "fresh"),
    ("Dull, lifeless and far too long.", "rotten"),
    ("One of the best films of the year.", "fresh"),
    ("A tedious mess with nothing to say.", "rotten"),
] * 5


@pytest.fixture(scope="module")
def results(tiny_variants, tmp_path_factory):
    out = tmp_path_factory.mktemp("perf")
    extra = out / "extra.csv"
    pd.DataFrame(EXTRA, columns=["text", "label"]).to_csv(extra, index=False)
    config = PerfConfig(
        eval_set=(f"extra={extra}",),
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
    assert set(names[2:]) == set(CPU_RECIPES)
    for e in res["entries"]:
        ss = e["single_stream"]
        assert ss["queries"] == 20 and 0 < ss["p50_ms"] <= ss["p90_ms"] <= ss["p99_ms"]
        assert set(e["offline"]) == {"8", "32"} and all(v["sentences_per_s"] > 0 for v in e["offline"].values())
        assert set(e["sweep"]) == {"1x16", "1x64", "8x16", "8x64"}
        assert e["memory"]["peak_rss_mb"] > e["memory"]["after_imports_mb"] > 0
        assert set(e["accuracy"]) == set(e["paired"]) == {"validation", "test", "extra"}
        assert all(0 <= a["accuracy"] <= 1 for a in e["accuracy"].values()) and e["bytes"] > 0
        assert e["paired"]["test"]["n"] == 64 and e["paired"]["extra"]["n"] == len(EXTRA)
        assert e["speedup"]["single_stream_p50_vs_a"] > 0
    assert res["sets"] == {"validation": 64, "test": 64, "extra": len(EXTRA)}
    fp32 = next(e for e in res["entries"] if e["name"] == "onnx-fp32")
    assert all(p["discordant"] == 0 and p["low"] == p["high"] == 0 for p in fp32["paired"].values())
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
    assert selection.rule["sets"] == ["validation", "extra"]  # selected on these; test held out
    for name in selection.rule["sets"]:
        fp32 = selection.rule["reference_accuracy"][name]
        assert fp32 + chosen["paired"][name]["low"] >= selection.rule["lines"][name] - 1e-9
        assert selection.figures["selection_sets"][name]["accuracy"] == chosen["accuracy"][name]["accuracy"]
    assert list(selection.figures["held_out"]) == ["test"]
    assert selection.figures["held_out"]["test"]["paired_to_onnx_fp32"] == chosen["paired"]["test"]
    assert entry.files["model.onnx"]["sha256"] == chosen["sha256"]
    assert selection.figures["single_stream"] == chosen["single_stream"]
    faster = [
        e
        for e in res["entries"]
        if e["kind"] == "variant"
        and e["name"] in selection.rule["resolved_variants"]
        and e["single_stream"]["p50_ms"] < chosen["single_stream"]["p50_ms"]
    ]
    assert faster == []
    report = (out / "perf" / "report.md").read_text()
    assert "Test (64 sentences) was not used to select" in report


def _entry(name, p50, acc, low=0.0, kind="variant", sets=("validation",)):
    """An entry as perf/bench.py builds it, with accuracy ``acc`` and paired interval low end ``low`` per set."""
    return {
        "name": name,
        "kind": kind,
        "single_stream": {"p50_ms": p50},
        "accuracy": {s: {"accuracy": acc} for s in sets},
        "paired": {s: {"difference": 0.0, "low": low, "high": 0.01, "n": 1000, "discordant": 10} for s in sets},
    }


def test_selection_respects_budget_on_validation_and_never_reads_test():
    entries = [
        _entry("onnx-fp32", 5.0, 0.80),
        _entry("int8-dynamic", 2.0, 0.795, low=-0.006),  # line 0.792: the interval's low end 0.794 clears it
        _entry("pruned-int8", 1.0, 0.70, low=-0.10),
        _entry(BASELINE_B, 0.5, 0.80, kind="baseline"),
    ]
    chosen = select(entries, 0.99, ["validation"])  # no entry has test scores: select cannot read them
    assert chosen["variant"] == "int8-dynamic" and chosen["budget_met"] and chosen["resolved"]
    assert chosen["within_budget"] == chosen["resolved_variants"] == ["int8-dynamic", "onnx-fp32"]
    assert chosen["lines"] == {"validation": 0.792}
    assert select(entries, 0.85, ["validation"])["variant"] == "pruned-int8"  # a looser budget: 0.70 >= 0.68
    assert select(entries, 1.0, ["validation"])["variant"] == "onnx-fp32"


def test_a_split_too_small_to_resolve_the_budget_falls_back(capsys):
    entries = [
        _entry("onnx-fp32", 5.0, 0.80),
        _entry("pruned-fp32", 3.0, 0.80, low=-0.004),  # resolved: 0.796 >= 0.792
        _entry("pruned-int8", 1.0, 0.81, low=-0.03),  # above fp32 on the point estimate, but 0.77 < 0.792
    ]
    chosen = select(entries, 0.99, ["validation"])
    assert chosen["variant"] == "pruned-fp32" and not chosen["resolved"]
    assert chosen["unresolved_faster"] == ["pruned-int8"]
    err = capsys.readouterr().err
    assert "validation (1,000 sentences) cannot resolve the 99% budget for pruned-int8" in err
    assert "[-3.00, +1.00], budget line -0.80; selected pruned-fp32" in err


def test_accepting_unresolved_picks_the_fastest_within_budget_and_says_so(capsys):
    entries = [
        _entry("onnx-fp32", 5.0, 0.80),
        _entry("pruned-fp32", 3.0, 0.80, low=-0.004),
        _entry("pruned-int8", 1.0, 0.81, low=-0.03),
    ]
    chosen = select(entries, 0.99, ["validation"], accept_unresolved=True)
    assert chosen["variant"] == "pruned-int8" and not chosen["resolved"] and "--accept-unresolved" in chosen["rule"]
    assert "selected pruned-int8 (--accept-unresolved)" in capsys.readouterr().err
    entries[2]["paired"]["validation"]["low"] = -0.005  # now shown to keep the budget
    assert select(entries, 0.99, ["validation"], accept_unresolved=True)["resolved"]


def test_the_budget_applies_to_every_selection_set():
    sets = ("validation", "ood")
    entries = [_entry("onnx-fp32", 5.0, 0.80, sets=sets), _entry("int8-dynamic", 2.0, 0.80, sets=sets)]
    entries[1]["accuracy"]["ood"]["accuracy"] = 0.70  # keeps validation, loses the out-of-domain set
    assert select(entries, 0.99, ["validation"])["variant"] == "int8-dynamic"
    assert select(entries, 0.99, list(sets))["variant"] == "onnx-fp32"


def test_no_variant_meets_budget_serves_fp32_with_warning(capsys):
    entries = [_entry("onnx-fp32", 5.0, 0.80), _entry("int8-dynamic", 2.0, 0.70), _entry("pruned-int8", 1.0, 0.60)]
    chosen = select(entries, 0.99, ["validation"])
    assert chosen["variant"] == "onnx-fp32" and not chosen["budget_met"]
    assert "no variant keeps 99% of onnx-fp32's accuracy" in capsys.readouterr().err
    with pytest.raises(UserError, match="onnx-fp32 is not among the valid variants"):
        select(entries[1:], 0.99, ["validation"])


def test_paired_interval_matches_the_normal_approximation():
    # 1,000 sentences; the variant is right on 50 the reference gets wrong and agrees elsewhere:
    # the difference is a mean of 0/1 values with p = 0.05, so the 95 % interval is close to
    # p +- 1.96 sqrt(p (1 - p) / n) = [0.0365, 0.0635].
    reference = np.zeros(1000, dtype=bool)
    variant = reference.copy()
    variant[:50] = True
    p = paired_difference(variant, reference, seed=1)
    assert p["difference"] == 0.05 and p["discordant"] == 50 and p["n"] == 1000
    assert p["low"] == pytest.approx(0.0365, abs=0.002) and p["high"] == pytest.approx(0.0635, abs=0.002)
    assert paired_difference(variant, reference, seed=1) == p  # the seed fixes the resamples
    same = paired_difference(reference, reference)
    assert same["low"] == same["high"] == same["difference"] == 0.0
    with pytest.raises(ValueError, match="paired answers needed"):
        paired_difference(variant, reference[:10])


def test_eval_set_errors_in_one_line(tmp_path):
    with pytest.raises(UserError, match=r"--eval-set 'ood' is not valid: expected NAME=PATH"):
        PerfConfig(eval_set=("ood",))
    with pytest.raises(UserError, match=r"--eval-set 'ood=/nonexistent.csv' is not valid: no such file"):
        PerfConfig(eval_set=("ood=/nonexistent.csv",))
    good = tmp_path / "ood.csv"
    pd.DataFrame([("fine", "fresh"), ("bad", "awful"), ("", "rotten")], columns=["text", "label"]).to_csv(
        good, index=False
    )
    with pytest.raises(UserError, match=r"is a directory; expected a CSV/TSV/JSONL file"):
        PerfConfig(eval_set=(f"ood={tmp_path}",))
    with pytest.raises(UserError, match=r"'test' is already a set's name"):
        PerfConfig(eval_set=(f"test={good}",))
    with pytest.raises(UserError, match=r"--eval-set ood: labels 'awful' are not the model's \('fresh', 'rotten'\)"):
        load_eval_set(good, "ood", ["fresh", "rotten"])
    with pytest.raises(UserError, match="--eval-set bad: .* needs columns named text and label; .* no column"):
        bad = tmp_path / "bad.csv"
        pd.DataFrame([("fine", "fresh")], columns=["sentence", "label"]).to_csv(bad, index=False)
        load_eval_set(bad, "bad", ["fresh", "rotten"])


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
    entry = {"name": "int8-dynamic", "accuracy": {"test": score(np.eye(3)[preds], truth, labels)}}
    results = {"entries": [entry], "selection": {"variant": "int8-dynamic"}}
    assert per_class_table(results).splitlines() == [
        "| entry | Democratic | Moderator | Republican |",
        "|---|---|---|---|",
        "| int8-dynamic | 0.6667 | 1.0000 | 0.6667 |",
    ]
    text = class_report(entry["accuracy"]["test"])
    assert "| Moderator | 1.0000 | 1.0000 | 1.0000 | 2 |" in text
    assert "| Republican | 1 | 0 | 2 |" in text  # rows: true class; columns: predicted
    plot_confusion(results, tmp_path / "confusion.png")
    assert (tmp_path / "confusion.png").stat().st_size > 5_000

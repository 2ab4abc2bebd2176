"""The README's family x recipe table, measured on the tiny models of tests/tiny_families.py.

    python -m tests.families_report [--steps 400] [--out DIR] [FAMILY ...]

For each family: build the tiny model, fine-tune it (long enough to beat the majority class,
so agreement figures mean something), export every recipe, and print one markdown table of
statuses and one of figures: onnx-fp32's max |logit difference| and label agreement against
PyTorch, int8-dynamic's agreement, and the MAC reduction of the pruned variants.  The same
code path as tests/test_families.py, with more steps and more sentences.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from serve.contract import TrainManifest, VariantsManifest, read
from tests import tiny_families
from tests.conftest import CPU_RECIPES

# From random weights ALBERT's one shared layer needs more steps to beat the majority class.
MIN_STEPS = {"albert": 800}


def measure(name: str, root: Path, steps: int, sentences: list[str]) -> dict:
    import torch

    from export.export import ExportConfig, export
    from train.train import TrainConfig, train

    torch.set_num_threads(1)  # tiny models: one thread is faster than two that spin against each other
    started = time.perf_counter()
    base = tiny_families.build(name, root / "base", sentences)
    train(
        TrainConfig(
            model=str(base),
            output=str(root / "model"),
            max_train_samples=4096,
            max_eval_samples=256,
            max_steps=steps,
            eval_steps=steps,
            batch_size=32,
            max_length=64,
            learning_rate=1e-3,
            threads=1,
        )
    )
    export(
        ExportConfig(
            model=str(root / "model"),
            output=str(root / "variants"),
            recipes=CPU_RECIPES,
            max_train_samples=1024,
            max_eval_samples=256,
            calibration_samples=64,
            importance_samples=256,
            distill_max_steps=50,
        )
    )
    manifest = read(root / "variants", VariantsManifest)
    records = {v.name: manifest.load(v) for v in manifest.ok()}
    return {
        "family": name,
        "train": read(root / "model", TrainManifest).metrics["test"],
        "status": {v.name: (v.status, v.error) for v in manifest.variants},
        "records": {
            k: {"check": r.check, "metrics": r.metrics, "pruning": r.pruning, "recipe": r.recipe}
            for k, r in records.items()
        },
        "seconds": round(time.perf_counter() - started, 1),
    }


def tables(results: list[dict]) -> str:
    head = "| family | " + " | ".join(CPU_RECIPES) + " |"
    lines = [head, "|---" * (len(CPU_RECIPES) + 1) + "|"]
    notes = {}
    for r in results:
        cells = []
        for recipe in CPU_RECIPES:
            status, error = r["status"][recipe]
            if status == "ok":
                cells.append("✓")
            else:
                key = notes.setdefault(error, f"({len(notes) + 1})")
                cells.append(f"{status} {key}")
        lines.append(f"| {r['family']} | " + " | ".join(cells) + " |")
    lines += [""] + [f"{key} {error}" for error, key in notes.items()] + [""]
    lines += [
        "| family | PyTorch test acc | onnx-fp32 max \\|dlogit\\| | onnx-fp32 agreement "
        "| int8-dynamic max \\|dlogit\\| | int8-dynamic agreement | lowest agreement, any variant "
        "| pruned-fp32 MACs/token | pruned-l3-fp32 MACs/token | pruned-fp32 heads per layer |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rec = r["records"]
        fp32, int8 = rec["onnx-fp32"]["check"], rec["int8-dynamic"]["check"]
        pruned, deep = rec["pruned-fp32"]["pruning"], rec["pruned-l3-fp32"]["pruning"]
        lowest = min(v["check"]["label_agreement"] for v in rec.values())
        lines.append(
            f"| {r['family']} | {r['train']['accuracy']:.4f} | {fp32['max_abs_logit_diff']:.1e} | "
            f"{fp32['label_agreement']:.4f} | {int8['max_abs_logit_diff']:.3f} | {int8['label_agreement']:.4f} | "
            f"{lowest:.4f} | -{pruned['flops_reduction']:.1%} | -{deep['flops_reduction']:.1%} | "
            f"{pruned['heads_per_layer']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("families", nargs="*", default=list(tiny_families.SPECS))
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps of 32 sentences")
    parser.add_argument("--out", default=None, help="working directory (default: a new temporary one)")
    parser.add_argument("--results", default=None, help="only print the tables of an earlier run's results.json")
    args = parser.parse_args()
    if args.results:
        print(tables(json.loads(Path(args.results).read_text())))
        return
    root = Path(args.out or tempfile.mkdtemp(prefix="families-report-"))
    sentences = tiny_families.training_sentences()
    results = []
    for name in args.families:
        results.append(measure(name, root / name, max(args.steps, MIN_STEPS.get(name, 0)), sentences))
        (root / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        print(f"{name}: {results[-1]['seconds']} s", flush=True)
    print(tables(results))


if __name__ == "__main__":
    main()

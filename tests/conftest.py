"""Shared fixtures: one tiny but real fine-tuning run that every stage's tests reuse.

``tiny_model`` trains once per session; ``tiny_fp32`` exports only onnx-fp32 from it (what
the serving tests need, in seconds); ``tiny_variants`` builds every CPU recipe (the export,
perf and batch-invariance tests, marked slow).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never reach a hub

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / ".tools"
# Every recipe export/ can build without a GPU (the default set and the opt-in ones), in build order.
CPU_RECIPES = (
    "onnx-fp32",
    "onnx-opt",
    "int8-dynamic",
    "int8-static",
    "pruned-fp32",
    "pruned-int8",
    "pruned-int8-static",
    "pruned-l4-fp32",
    "pruned-l4-int8",
    "pruned-l4-int8-static",
    "pruned-l3-fp32",
    "pruned-l3-int8",
)


def _stage_dir(tmp_path_factory, name: str) -> tuple[Path, bool]:
    """Where a session fixture builds ``name``, and whether it is already built there.

    With ``TRIMSERVE_TEST_CACHE=DIR`` (a developer's loop; CI leaves it unset) the tiny model and
    its fp32 export are kept in DIR and reused by later runs: delete DIR after changing train/
    or export/.
    """
    cache = os.environ.get("TRIMSERVE_TEST_CACHE")
    if cache:
        path = Path(cache) / name
        return path, (path / ".complete").is_file()
    return tmp_path_factory.mktemp("stage") / name, False


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """all-MiniLM-L6-v2 fine-tuned for a few dozen steps on a slice of the default data.

    Long enough to separate clearly positive from clearly negative reviews, short enough
    (~40 s on 2 cores) for every test run.
    """
    from train.train import TrainConfig, train

    out, built = _stage_dir(tmp_path_factory, "model")
    if not built:
        train(
            TrainConfig(
                output=str(out),
                max_train_samples=2048,
                max_eval_samples=128,
                max_steps=60,
                batch_size=32,
                eval_steps=30,
                max_length=64,
                learning_rate=2e-4,
                overwrite=True,
            )
        )
        (out / ".complete").touch()
    return out


def _export(tiny_model: Path, out: Path, recipes: tuple[str, ...] = ()) -> Path:
    from export.export import ExportConfig, export

    export(
        ExportConfig(
            model=str(tiny_model),
            output=str(out),
            recipes=recipes or CPU_RECIPES,
            overwrite=True,
            max_train_samples=256,
            max_eval_samples=128,
            calibration_samples=16,
            importance_samples=64,
            distill_max_steps=4,
        )
    )
    return out


@pytest.fixture(scope="session")
def tiny_fp32(tiny_model, tmp_path_factory) -> Path:
    """A variants dir holding onnx-fp32 only (numerically the fine-tuned model itself)."""
    out, built = _stage_dir(tmp_path_factory, "fp32")
    if not built:
        _export(tiny_model, out, ("onnx-fp32",))
        (out / ".complete").touch()
    return out


@pytest.fixture(scope="session")
def tiny_variants(tiny_model, tmp_path_factory) -> Path:
    """Every CPU recipe built from ``tiny_model`` with small samples; returns the variants dir."""
    return _export(tiny_model, tmp_path_factory.mktemp("stage") / "variants")


@pytest.fixture(scope="session")
def served_variant(tiny_fp32):
    """(manifest, entry, record, directory) of the onnx-fp32 variant the serving tests use."""
    from serve.contract import VariantsManifest, read

    manifest = read(tiny_fp32, VariantsManifest)
    entry = manifest.entry("onnx-fp32")
    return manifest, entry, manifest.load(entry), manifest.directory(entry)


# --- promtool and prometheus (tests/test_deploy.py, the /metrics page) ------------------------


@dataclasses.dataclass(frozen=True)
class PromTools:
    promtool: Path
    prometheus: Path

    def run(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.promtool), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
        )


def _find_tools() -> PromTools | None:
    on_path = shutil.which("promtool"), shutil.which("prometheus")
    if all(on_path):
        return PromTools(*map(Path, on_path))
    unpacked = TOOLS / "usr" / "bin"
    if (unpacked / "promtool").exists() and (unpacked / "prometheus").exists():
        return PromTools(unpacked / "promtool", unpacked / "prometheus")
    return None


def _fetch_tools() -> str | None:
    """Unpack Debian's prometheus package into .tools/ (no root, no daemon); None, or why not."""
    debs = TOOLS / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    try:
        download = subprocess.run(
            ["apt-get", "download", "prometheus"], cwd=debs, capture_output=True, text=True, timeout=300, check=False
        )
        found = sorted(debs.glob("prometheus_*.deb"))
        if not found:
            return f"apt-get download prometheus failed: {(download.stderr.strip() or 'no .deb').splitlines()[-1]}"
        unpack = subprocess.run(
            ["dpkg", "-x", str(found[-1]), str(TOOLS)], capture_output=True, text=True, timeout=300, check=False
        )
        if unpack.returncode:
            return f"dpkg -x {found[-1].name} failed: {unpack.stderr.strip()}"
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"fetching Debian's prometheus package failed: {err}"
    return None


@pytest.fixture(scope="session")
def prom() -> PromTools:
    tools = _find_tools()
    if tools is None:
        why = _fetch_tools()
        tools = _find_tools()
        if tools is None:
            pytest.skip(
                f"no promtool/prometheus on PATH or in .tools/usr/bin, and {why or 'unpacking found none'}; "
                "install Debian's prometheus package (apt-get install prometheus) or put both on PATH"
            )
    return tools

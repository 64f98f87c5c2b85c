"""benchmarks/gpu.sh, the one prepared script for a GPU machine: its CPU dry run (toy sizes, same commands)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.sh"
SECTIONS = ["cuda_tests", "bench_b64", "bench_b256", "infopro_b64", "infopro_b256", "variant_fp32", "variant_bf16_cl", "variant_bf16_cl_cudnn",
            "variant_compile", "train", "nccl_data_parallel", "nccl_layer_parallel"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def _run(tmp_path, only=None, *args, timeout=900):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    if only:
        env["ONLY"] = only
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_syntax_and_help():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    result = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--dry-run" in result.stdout
    result = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True)
    assert result.returncode == 2 and "unknown argument" in result.stderr


def test_dry_run_bench_section(tmp_path):
    """One bench section end to end on the CPU: every method, the JSON and the summary; the rest not selected."""
    result = _run(tmp_path, "bench_b64", "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] and summary["ok"]
    by_name = {s["name"]: s for s in summary["sections"]}
    assert by_name["bench_b64"]["status"] == "ok"
    assert set(by_name["bench_b64"]["vs_bp"]) == {"checkpoint", "auglocal", "dgl", "predsim", "greedy"}
    assert all(by_name[n]["status"] == "skipped" for n in by_name if n != "bench_b64")
    report = json.loads((out / "bench_b64.json").read_text())
    assert report["config"]["device"] == "cpu" and report["config"]["batch"] == 4
    assert (out / "bench_b64.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_full_dry_run(tmp_path):
    """Every section at toy sizes on the CPU (a few minutes on 2 cores)."""
    result = _run(tmp_path, None, "--dry-run", timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    names = [s["name"] for s in summary["sections"]]
    assert set(SECTIONS) <= set(names)
    assert all(s["status"] == "ok" for s in summary["sections"] if s["name"] != "variant_compile")

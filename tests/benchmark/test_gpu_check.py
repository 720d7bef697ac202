"""The prepared device check (``scripts/check_gpu.sh``), rehearsed on the CPU so that it works the first time a GPU
is lent: every part runs with the flags it runs with there, from the checkout, with carried wheels installed beside
the machine's packages; and where it cannot run, it stops before spending the lease."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import zipfile
from pathlib import Path

from script_loader import ROOT

CHECK = ROOT / "scripts" / "check_gpu.sh"


def make_wheel(folder: Path, name: str, version: str, init: str) -> Path:
    """A pure-Python wheel of one package ``name`` whose ``__init__.py`` is ``init``, built by hand (a wheel is a
    zip with its metadata; RECORD holds each file's hash, as pip checks)."""
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": init,
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{dist_info}/top_level.txt": f"{name}\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{dist_info}/RECORD"] = "\n".join([*record, f"{dist_info}/RECORD,,"]) + "\n"
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def run_check(out: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(CHECK), str(out)],
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_gpu_check_rehearsed_on_the_cpu_runs_every_part_with_the_carried_wheels(tmp_path):
    """The GPU image lacks pytorch_optimizer: a carried stand-in that fails to import (as a missing package
    does) is installed ahead of the machine's own, reported as such, and the optimizer benchmark leaves its row
    out and says so; every other part writes its output."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(wheels, "pytorch_optimizer", "0.0.1", "raise ImportError('not on this image')\n")
    out = tmp_path / "out"
    done = run_check(out, ZSAM_CHECK_REHEARSAL="1", ZSAM_CHECK_WHEELS=str(wheels))
    assert done.returncode == 0, done.stdout + done.stderr

    environment = (out / "environment.txt").read_text()
    assert f"from {ROOT / 'zsam_hf'}" in environment  # the checkout, installed or not
    assert "pytorch-optimizer   0.0.1" in environment and "OUTSIDE the stated range" in environment
    assert "carried: pytorch_optimizer 0.0.1, does not import: ImportError: not on this image" in environment
    assert "device: cpu" in environment

    # The GPU tests were collected from the checkout (and skip here): at least as many as its test functions.
    gpu_tests = sum(
        line.startswith("def test_") for line in (ROOT / "tests/gpu/test_cuda.py").read_text().splitlines()
    )
    skipped = re.search(r"(\d+) skipped in", (out / "tests_gpu.txt").read_text())
    assert gpu_tests > 0 and skipped and int(skipped.group(1)) >= gpu_tests

    trainer = json.loads((out / "step_trainer.json").read_text())
    assert [r["workload"] for r in trainer["results"]] == ["resnet10t@16x2"]
    assert "ZSAM (ours) / SAM step-time ratio" in (out / "step_trainer.txt").read_text()

    optimizer = (out / "step_optimizer.txt").read_text()
    assert "pytorch_optimizer is not installed: its SAM row is left out" in optimizer
    assert "SAM (pytorch_optimizer)" not in optimizer
    assert "ZSAM (ours) / SAM (ours):" in optimizer and "capturable (eager): ZSAM / SAM" in optimizer
    assert json.loads((out / "step_optimizer.json").read_text())["results"]


def test_the_gpu_check_stops_after_the_environment_where_no_gpu_is_visible(tmp_path):
    """Run for real where torch sees no GPU (none is made visible, on any machine), the check says so and stops:
    no part that cannot run spends the lease, and the exit status is a failure."""
    out = tmp_path / "out"
    done = run_check(
        out, ZSAM_CHECK_REHEARSAL="0", ZSAM_CHECK_WHEELS=str(tmp_path / "none"), CUDA_VISIBLE_DEVICES=""
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "device: no CUDA device is visible to torch" in (out / "environment.txt").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["environment.txt"]

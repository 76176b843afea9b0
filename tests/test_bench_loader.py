"""``pipeline bench loader`` end to end on a few photos: local disk, its own loopback S3 and HTTP servers, both
backends and both DALI readers, the open_clip-style pipeline; only that it runs and reports what it says it
measures (speed belongs to benchmarks/results, never to a test)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nvidia.dali")
pytest.importorskip("moto")
ROOT = Path(__file__).resolve().parents[1]


def test_bench_loader_reads_every_source_and_reports_ratios(tmp_path):
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray((rng.random((750, 1000, 3)) * 255).astype(np.uint8)).save(photos / f"p{i}.jpg", quality=80)
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "pipeline", "bench", "loader", "--photos", str(photos), "--workdir",
           str(tmp_path / "work"), "--images", "32", "--image-size", "32", "--batch-size", "8", "--batches", "2",
           "--repeats", "1", "--sources", "local", "s3", "http", "--dali-readers", "native", "stream", "--openclip",
           "--output", str(out), "--name", "loader-test"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "loader-test.json").read_text())["results"]
    cases = {(r["source"], r["backend"], r["dali_reader"]) for r in results}
    assert cases == {("local", "dali", "native"), ("local", "dali", "stream"), ("local", "torch", "-"),
                     ("local", "openclip", "-"), ("s3", "dali", "native"), ("s3", "dali", "stream"),
                     ("s3", "torch", "-"), ("http", "dali", "stream"), ("http", "torch", "-"),
                     ("http", "openclip", "-")}  # DALI's own reader cannot open http://
    assert all(r["images_per_sec"] > 0 and len(r["runs_images_per_sec"]) == 1 for r in results)
    assert all("vs_local" in r for r in results if r["source"] != "local")
    assert all("vs_openclip" in r for r in results if r["backend"] == "torch" and r["source"] != "s3")
    assert "remote / local" in (out / "loader-test.md").read_text()
    assert all("vs_local_native" in r for r in results if r["source"] != "local" and r["backend"] == "dali")

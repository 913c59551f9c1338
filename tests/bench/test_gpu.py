"""bench.gpu (issue 15 item 5): refused without CUDA unless asked; on the CPU with --tiny its forward and
student parts run and report what they measured (the figures mean nothing on a CPU: the code path is the test)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: the benchmark would run")
def test_without_cuda_it_refuses_in_one_line():
    out = subprocess.run([sys.executable, "-m", "bench.gpu"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m bench.gpu: no CUDA device here"), out.stderr


def test_the_tiny_run_measures_the_forward_the_job_and_the_student(tmp_path, monkeypatch):
    """Every part, the job through its unit runner in this process (the Ray job is
    ``bench.cache_throughput.job_seconds``, as ``bench.scale`` runs it); the student from the job's cache."""
    from bench import common, gpu
    from pipeline.store import CacheStore

    monkeypatch.setattr(common, "OUT", tmp_path)
    res = gpu.main(["--allow-cpu", "--tiny", "--parts", "forward", "job", "student", "tests", "--job-runner", "in-process",
                    "--images", "8", "--per-tar", "4", "--job-batch", "4", "--iters", "1", "--rounds", "2",
                    "--student-batch", "4", "--workers", "0", "--warmup", "1", "--slice", "1",
                    "--workdir", str(tmp_path / "w")])
    assert [(r["teacher"], r["variant"]) for r in res["forward"]] == [
        ("vit_tiny_patch16_224", v) for v in ("fp32", "bf16", "bf16+channels_last")]
    assert all(r["images_per_s"] > 0 and r["batch"] == 4 for r in res["forward"])
    st = res["student"]
    assert st["student"] == "resnet18" and st["cached_kd_vs_no_kd"]["rounds"] == 2
    per_round = st["cached_kd_vs_no_kd"]["per_round"]
    assert all(r > 0 for r in per_round)
    job = res["job"]
    assert job["runner"] == "in-process" and job["views_steady"] == 4  # the second tar's 4 views: the first warms
    m = CacheStore(job["cache"], read_only=True).read_manifest()
    assert m.status == "complete" and m.dataset.num_samples == 8 and m.teacher.model == "vit_tiny_patch16_224"
    assert job["job_vs_forward"]["rounds"] == 2 and all(r > 0 for r in job["job_vs_forward"]["per_round"])
    # the gpu tests: only the files that hold them, each test skipped here (no CUDA)
    assert res["tests"]["files"] == ["tests/pipeline/test_teacher.py", "tests/student/test_feature_methods.py"]
    assert res["tests"]["returncode"] == 0 and "2 skipped" in res["tests"]["summary"], res["tests"]
    assert (tmp_path / "gpu.json").exists()

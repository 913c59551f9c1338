"""Shared fixtures: the digits shards, a tiny teacher trained on them, one local Ray instance, and the
caches built from them (with Ray: ``reference``; in process: ``small_cache``).

Two layers: a test that uses a Ray fixture is marked ``ray`` here, and a test not marked ``ray`` that
starts Ray fails, so ``pytest -m "not ray"`` runs without Ray.
"""

from __future__ import annotations

import os

import pytest
import torch

# A kdcache subprocess that fails on a bug shows its traceback in the test's report (user errors stay one line).
os.environ.setdefault("KDCACHE_DEBUG", "1")

TINY_VIT = {"model": "vit_tiny_patch16_224",
            "model_kwargs": {"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 48, "num_heads": 2,
                             "num_classes": 10},
            "input_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> dict:
    """scikit-learn's digits as WebDataset shards (train 4 tars, val 2 tars)."""
    from pipeline.digits import write_digits

    out = tmp_path_factory.mktemp("digits")
    return write_digits(str(out))


@pytest.fixture(scope="session")
def tiny_teacher(digits, tmp_path_factory) -> dict:
    """A tiny ViT trained briefly on the digits (real data) by the trainer without a cache, saved as safetensors."""
    from safetensors.torch import save_file

    from student.config import TrainConfig
    from student.trainer import Trainer

    run = tmp_path_factory.mktemp("teacher")
    cfg = TrainConfig.model_validate({
        "student": {k: TINY_VIT[k] for k in ("model", "model_kwargs", "input_size", "mean", "std")},
        "methods": "ce", "data": {"train_urls": digits["train"].replace("{000000..000003}", "{000000..000001}"),
                                  "views": {"crop": {"scale": (0.5, 1.0)}, "hflip": 0.0, "randaugment": None,
                                            "erase": None}},
        "optim": {"lr": 3e-3, "epochs": 2}, "output": str(run / "run"),
    })
    trainer = Trainer(cfg, progress=False)
    trainer.fit()
    path = run / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in trainer.model.student.state_dict().items()}, str(path))
    return {**TINY_VIT, "checkpoint": str(path)}


@pytest.fixture(scope="session")
def ray_local():
    """One private local Ray instance for every Ray test of the session."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


RAY_FIXTURES = {"ray_local"}  # every fixture that starts Ray depends on this one (``reference`` does)


def cache_config(digits: dict, teacher: dict, out: str, **overrides) -> dict:
    """A small cache config as a plain dict (the YAML's shape)."""
    cfg = {
        "input": {"urls": digits["train"]},
        "output": {"url": out},
        "teacher": {k: v for k, v in teacher.items()},
        "views": {"seed": 0, "num_views": 2, "hflip": 0.5, "randaugment": "rand-m9-mstd0.5-inc1",
                  "erase": {"prob": 0.5}},
        "targets": {"logits": {"mode": "topk", "k": 5},
                    "features": [{"name": "block0", "index": 0}, {"name": "final", "index": -1, "norm": True}],
                    "tpp": {"tail": 1}},
        "job": {"batch_size": 64, "chunk_rows": 128},
    }
    for dotted, value in overrides.items():
        node = cfg
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


def damaged_copy(cache: dict, out, view: int = 0):
    """A copy of ``cache`` (a fixture's dict) at ``out`` whose final tap's shard of tar 0, ``view`` has one byte
    flipped (its crc32c then fails); returns that shard's path."""
    import shutil

    from storage_schemas import layout
    from student.data import target_arrays

    shutil.copytree(cache["path"], out)
    m = cache["manifest"]
    tap = target_arrays(m, logits=False, taps=["final"])[0]
    shard = out / layout.array_shard_key(tap, 0, view, len(m.arrays[tap].shape) - 2)
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    return shard


@pytest.fixture
def no_aws_env(monkeypatch):
    """No AWS_* credentials, region or profile and no KDCACHE_S3_READS from the caller's environment (the S3 read
    tests choose their own); the monkeypatch, to set more."""
    from pipeline import s3_reads

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION",
                "AWS_DEFAULT_REGION", s3_reads.ENV):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.fixture(scope="session")
def moto_s3():
    """A moto S3 server on 127.0.0.1 (loopback only) with one bucket; s3fs options to reach it."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    creds = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing-secret-0xKDC"}
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **creds).create_bucket(Bucket="kdcache")
    opts = {"key": creds["aws_access_key_id"], "secret": creds["aws_secret_access_key"],
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    yield {"endpoint": endpoint, "bucket": "kdcache", "storage_options": opts}
    server.stop()


@pytest.fixture(scope="session")
def reference(digits, tiny_teacher, ray_local, tmp_path_factory):
    """The cache every comparison starts from: tiny teacher, digits train, 2 views, ViTKD/ScaleKD taps, TPP."""
    from pipeline.job import run_cache_job
    from storage_schemas.config import CacheConfig

    out = tmp_path_factory.mktemp("ref") / "cache.zarr"
    cfg = CacheConfig.model_validate(cache_config(digits, tiny_teacher, str(out)))
    m = run_cache_job(cfg, progress=False)
    return {"cfg": cfg, "manifest": m, "path": out}


@pytest.fixture(scope="session")
def small_digits(tmp_path_factory) -> dict:
    """The digits split 20/80 instead: 359 training samples in 4 tars (the Ray-free tests stream them often)."""
    from pipeline.digits import write_digits

    return write_digits(str(tmp_path_factory.mktemp("small_digits")), val_fraction=0.8)


@pytest.fixture(scope="session")
def small_cache(small_digits, tiny_teacher, tmp_path_factory):
    """``reference``'s config over ``small_digits``, built in this process without Ray (the in-process build
    writes what the Ray job writes: ``tests/pipeline/test_job.py::test_in_process_build_is_byte_identical``)."""
    from pipeline.job import build_cache_in_process
    from storage_schemas.config import CacheConfig

    out = tmp_path_factory.mktemp("small") / "cache.zarr"
    cfg = CacheConfig.model_validate(cache_config(small_digits, tiny_teacher, str(out)))
    m = build_cache_in_process(cfg, log=lambda s: None)
    return {"cfg": cfg, "manifest": m, "path": out, "digits": small_digits}


MIX = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "prob": 0.9, "window": 32}  # ~90 samples a tar: 3 blocks each


@pytest.fixture(scope="session")
def mixed_cache(small_digits, tiny_teacher, tmp_path_factory):
    """``small_cache`` with mixed views (``views.mix: MIX``), built in this process without Ray."""
    from pipeline.job import build_cache_in_process
    from storage_schemas.config import CacheConfig

    out = tmp_path_factory.mktemp("mixed") / "cache.zarr"
    cfg = CacheConfig.model_validate(cache_config(small_digits, tiny_teacher, str(out), views__mix=MIX))
    m = build_cache_in_process(cfg, log=lambda s: None)
    return {"cfg": cfg, "manifest": m, "path": out, "digits": small_digits}


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects: the marker added here must count
def pytest_collection_modifyitems(config, items):
    """A test that uses a Ray fixture is marked ``ray``, and must live in one of :data:`RAY_FILES`;
    ``gpu`` tests are skipped, with the reason shown, where there is no CUDA device."""
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())) and "ray" not in item.keywords:
            item.add_marker(pytest.mark.ray)
        if "ray" in item.keywords and item.nodeid.split("::", 1)[0] not in RAY_FILES:
            raise pytest.UsageError(f"{item.nodeid} is a Ray test in a file missing from RAY_STREAMS "
                                    "(tests/conftest.py): add the file to one of them, so that `make test` runs it in a "
                                    "Ray stream and never beside another Ray test of its stream")
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# --- Ray tests in two streams, one per pytest-xdist worker, then all others shared --------------------

# Every file that holds a ``ray`` test (checked at collection, above), in two streams of about equal length.
# ``make test`` runs pytest-xdist with two workers: each starts on one stream and runs its files one after
# another, then both share every other file. Two Ray tests of one stream never run side by side (each starts
# Ray and its actors; those of the job's tests wait for the job's actors to go, told apart by the xdist worker:
# ``tests.pipeline.test_job._actor_pids``). A Ray stream alone left a core ~30 % idle (processes starting,
# waiting on Ray; measured with vmstat over a CI run: README, "Tests"), so two run beside each other.
RAY_STREAMS = (
    frozenset({"tests/pipeline/test_kill_points.py", "tests/pipeline/test_bad_input_job.py",
               "tests/pipeline/test_lease.py", "tests/pipeline/test_export_wds.py"}),
    frozenset({"tests/jobs/test_train_ray.py", "tests/pipeline/test_catalog.py", "tests/pipeline/test_job.py",
               "tests/jobs/test_demo.py", "tests/student/test_trainer.py"}),
)
RAY_FILES = frozenset().union(*RAY_STREAMS)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist (a dev dependency): absent without it
def pytest_xdist_make_scheduler(config, log):
    """xdist's scheduling by file (``--dist loadfile``), with each of :data:`RAY_STREAMS` one scope (so one worker
    runs its files in turn) and every other file a scope of its own. The Ray scopes are handed out first (they
    are the longest), so the workers start on them at once and share the rest."""
    from collections import OrderedDict

    from xdist.scheduler import LoadFileScheduling

    class RayFirst(OrderedDict):
        def popitem(self, last: bool = True):
            ray = [k for k in self if k.startswith("ray-")]
            return (ray[0], self.pop(ray[0])) if not last and ray else super().popitem(last)

    class RayApart(LoadFileScheduling):
        def __init__(self, config, log=None):
            super().__init__(config, log)
            self.workqueue = RayFirst()

        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return next((f"ray-{i}" for i, files in enumerate(RAY_STREAMS) if path in files), path)

    return RayApart(config, log)


# --- no Ray outside ``ray`` tests ------------------------------------------------------------------

_ray_allowed = True  # outside a test (collection, session teardown) Ray is not policed


def _guarded_ray_init(init):
    def guarded(*args, **kwargs):
        if not _ray_allowed:
            pytest.fail("this test starts Ray but is not marked `ray` (use the `ray_local` fixture, or mark it); "
                        "`pytest -m 'not ray'` must run without Ray", pytrace=False)
        return init(*args, **kwargs)

    guarded.kdcache_unguarded = init
    return guarded


def pytest_configure(config):
    import ray  # the pipeline imports it anyway; imported here so that ray.init can be guarded

    if not hasattr(ray.init, "kdcache_unguarded"):
        ray.init = _guarded_ray_init(ray.init)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Setup, call and teardown of a test not marked ``ray`` (its fixtures included) may not start Ray."""
    global _ray_allowed
    _ray_allowed = "ray" in item.keywords
    try:
        return (yield)
    finally:
        _ray_allowed = True

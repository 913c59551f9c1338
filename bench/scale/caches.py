"""The caches :mod:`bench.scale`'s reader reads (part 3): real-size teachers' targets from a synthetic forward
with the real shapes and statistics (also :mod:`bench.reader_memory`'s cache)."""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from pipeline.store import CacheStore
from pipeline.teacher import Teacher, TeacherOutput
from storage_schemas.config import JobConfig

from .caching import scale_config
from .spec import READER_CACHES, TEACHERS


@contextlib.contextmanager
def synthetic_forward(seed: int = 0) -> Iterator[None]:
    """Within: every :class:`~pipeline.teacher.Teacher` runs its real forward once, on the first two rows of its
    first batch, and from then on answers random outputs of the same shapes, drawn per channel with the mean and
    standard deviation of that real output (logits, each tap, the TPP tail's input), seeded. Everything else
    of a cache build is real (tars, views, encoding, compression, Zarr writes, manifest): the rows a reader
    reads have the real shapes and dtypes and about the real compressibility, at the cost of the data path,
    not of the teacher's forward, which on 2 CPU cores takes seconds an image."""
    real = Teacher.__call__
    stats: dict[int, dict] = {}
    g = torch.Generator().manual_seed(seed)

    def moments(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = t.reshape(-1, t.shape[-1])
        return flat.mean(0), flat.std(0) if len(flat) > 1 else torch.zeros(t.shape[-1])

    def draw(shape: tuple, m: tuple[torch.Tensor, torch.Tensor], n: int) -> torch.Tensor:
        return m[0] + m[1] * torch.randn((n, *shape), generator=g)

    def forward(self: Teacher, x: torch.Tensor, views=None) -> TeacherOutput:
        if id(self) not in stats:
            out = real(self, x[:2], None if views is None else views[:2])
            stats[id(self)] = {"logits": (out.logits.shape[1:], moments(out.logits)),
                               "features": {k: (v.shape[1:], moments(v)) for k, v in out.features.items()},
                               "tail_input": None if out.tail_input is None else
                               (out.tail_input.shape[1:], moments(out.tail_input))}
        st, n = stats[id(self)], len(x)
        return TeacherOutput(logits=draw(*st["logits"], n),
                             features={k: draw(*v, n) for k, v in st["features"].items()},
                             tail_input=None if st["tail_input"] is None else draw(*st["tail_input"], n))

    Teacher.__call__ = forward
    try:
        yield
    finally:
        Teacher.__call__ = real


def reader_chunk_rows(per_tar: int) -> int:
    """Rows a Zarr chunk of the reader's caches: the job's default (64), fewer when a tar holds fewer."""
    return min(per_tar, JobConfig.model_fields["chunk_rows"].default)


def reader_caches(tmp: Path, per_tar: int, tars: int, batch_size: int) -> tuple[dict, dict[str, str]]:
    """The caches the reader reads: ``tars`` synthetic tars of ``per_tar`` images cached for each real-size teacher
    by :func:`pipeline.job.build_cache_in_process` (the job's steps and bytes, without Ray) under
    :func:`synthetic_forward`, in Zarr chunks of :func:`reader_chunk_rows`. Larger than the caching benchmark's
    data, which the real
    forward makes costly: a reader pays fixed costs per tar (opening it and its unit's arrays; on S3 a few requests
    an array) that ImageNet's 1,250 samples a tar amortise, and reads the next tar's rows ahead only when a worker
    has more than one tar an epoch. Reused from an earlier run in the same ``--workdir`` with the same config."""
    from pipeline.job import build_cache_in_process
    from pipeline.synthetic import write_synthetic

    data = write_synthetic(str(tmp / "reader-data"), classes=1000, images=per_tar * tars, per_tar=per_tar, seed=1)
    caches = {}
    for key, (model, dtype, compression) in READER_CACHES.items():
        t0 = time.perf_counter()
        cfg = scale_config(model, TEACHERS[model], data["train"], str(tmp / f"reader-{key}.zarr"),
                           batch_size=batch_size, chunk_rows=reader_chunk_rows(per_tar), feature_dtype=dtype,
                           feature_compression=compression)
        caches[key] = cfg.output.url
        store = CacheStore(cfg.output.url)
        if (store.has_manifest() and (m := store.read_manifest(allow_partial=True)).status == "complete"
                and m.config.public_dict() == cfg.public_dict()):  # from an earlier run in the same --workdir
            continue
        if Path(cfg.output.url).exists():
            shutil.rmtree(cfg.output.url)
        with synthetic_forward():
            build_cache_in_process(cfg, log=lambda s: None)
        print(f"reader cache {key} ({model}, {dtype}, {cfg.output.feature_compression}): {per_tar * tars} views in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    return data, caches

"""One work unit (input tar, view): read, replay views, run the teacher, write one Zarr shard.

:class:`UnitRunner` is what a Ray actor holds: ``__init__`` loads the teacher once,
``__call__`` runs a unit. It works without Ray too (tests, debugging).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import torch

from storage_schemas import arrays as A
from storage_schemas.config import CacheConfig
from storage_schemas.manifest import FidelityAcc, Manifest, SkippedSample, UnitRecord

from .shards import Sample, iter_samples
from .store import CacheStore
from .targets import extract_targets, input_fingerprint
from .teacher import Teacher
from .views import apply_view, sample_view

T = TypeVar("T")
R = TypeVar("R")


def prefetch_map(fn: Callable[[T], R], items: Iterable[T], workers: int, lookahead: int) -> Iterator[R]:
    """``map(fn, items)`` in order, computed ``lookahead`` items ahead on a thread pool.

    Decoding and augmenting (PIL/torchvision, which release the GIL in their C parts)
    overlaps the teacher's forward pass this way; unlike ``Executor.map`` it does not
    consume the whole input up front, so memory stays bounded on large shards.
    """
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= lookahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def batched(it: Iterable[T], n: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def config_with_secrets(m: Manifest, secrets: dict[str, dict]) -> CacheConfig:
    """The manifest's stored config with the storage options (never stored) put back."""
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in m.config.items()}
    d["input"]["storage_options"] = secrets.get("input", {})
    d["output"]["storage_options"] = secrets.get("output", {})
    d["teacher"]["checkpoint_storage_options"] = secrets.get("checkpoint", {})
    return CacheConfig.model_validate(d)


def make_teacher(cfg: CacheConfig, m: Manifest, device: str) -> Teacher:
    tail_idx = m.tpp.spec.input_index if m.tpp else None
    return Teacher(cfg.teacher, cfg.targets.features, keep_prefix_tokens=cfg.targets.keep_prefix_tokens,
                   tail_input_index=tail_idx, device=device)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("job.device is 'cuda' but this worker has no CUDA device")
    return device


class UnitRunner:
    """Holds the teacher and the open store; ``runner(shard, view)`` caches one unit."""

    def __init__(self, url: str, secrets: dict[str, dict], *, num_threads: int | None = None,
                 manifest: Manifest | None = None) -> None:
        self.store = CacheStore(url, secrets.get("output"))
        # the layout being written: the job passes it (during a growth it is not the stored manifest yet)
        self.m = manifest or self.store.read_manifest(allow_partial=True)
        self.cfg = config_with_secrets(self.m, secrets)
        if num_threads:
            torch.set_num_threads(num_threads)
        self.threads = num_threads or 1
        self.teacher = make_teacher(self.cfg, self.m, resolve_device(self.cfg.job.device))
        if self.teacher.weights_sha256 != self.m.teacher.weights_sha256:
            raise RuntimeError(
                f"{url}: the teacher's weights (sha256 {self.teacher.weights_sha256[:12]}…) differ from the "
                f"ones this cache was started with ({self.m.teacher.weights_sha256[:12]}…); the checkpoint "
                "changed. Restore it, or cache to a new output URL."
            )

    def _prepare(self, shard: int, view: int, s: Sample) -> dict[str, Any]:
        if s.image is None:
            return {"position": s.position, "key": s.key, "skip": s.skip_reason}
        recipe = self.cfg.views
        # sample_view's fields are float32-exact, so this record is exactly what gets stored
        # and what a student replays (tests/pipeline/test_views.py checks the round trip).
        rec = sample_view(recipe, shard=shard, position=s.position, view=view,
                          width=s.image.width, height=s.image.height)
        x = apply_view(s.image, rec, recipe, size=self.teacher.input_size,
                       mean=self.teacher.mean, std=self.teacher.std)
        return {"position": s.position, "key": s.key, "label": s.label, "record": rec, "x": x}

    def __call__(self, shard: int, view: int) -> UnitRecord:
        t0 = time.time()
        m, cfg = self.m, self.cfg
        info = m.dataset.shards[shard]
        keys = self.store.read_index(shard)
        samples = iter_samples(info.url, cfg.input.storage_options, on_bad_sample=cfg.input.on_bad_sample,
                               num_classes=m.teacher.num_classes, keys=keys)
        count = info.count
        # Full-unit buffers, rows in tar order; rows of skipped samples keep the fill value.
        out = {n: np.full((count, *a.shape[2:]), a.fill, dtype=a.dtype) for n, a in m.arrays.items()}
        records: list = [None] * count
        skipped: list[SkippedSample] = []
        fid: dict[str, FidelityAcc] = {}
        tsum = tsq = None
        tcount = 0
        prepared = prefetch_map(lambda s: self._prepare(shard, view, s), samples,
                                workers=self.threads, lookahead=2 * cfg.job.batch_size)
        for batch in batched(prepared, cfg.job.batch_size):
            for p in batch:
                if "skip" in p:
                    skipped.append(SkippedSample(shard=shard, url=info.url, key=p["key"], reason=p["skip"]))
            good = [p for p in batch if "x" in p]
            if not good:
                continue
            pos = np.array([p["position"] for p in good])
            x = torch.stack([p["x"] for p in good])
            teacher_out = self.teacher(x)
            arrays, f = extract_targets(teacher_out, logits_mode=m.logits.mode if m.logits else None,
                                        logits_k=m.logits.k if m.logits else 0,
                                        feature_dtype=cfg.targets.feature_dtype)
            arrays[A.VIEW_FINGERPRINT] = input_fingerprint(x, cfg.targets.fingerprint_size)
            arrays[A.LABEL] = np.array([p["label"] for p in good], np.int32)
            arrays[A.VALID] = np.ones(len(good), np.uint8)
            for name, rows in arrays.items():
                out[name][pos] = rows
            for p in good:
                records[p["position"]] = p["record"]
            for k, acc in f.items():
                fid[k] = fid[k].merge(acc) if k in fid else acc
            if teacher_out.tail_input is not None:
                tokens = teacher_out.tail_input[:, self.teacher.num_prefix_tokens:].double()
                s1, s2 = tokens.sum((0, 1)), (tokens * tokens).sum((0, 1))
                tsum, tsq = (s1, s2) if tsum is None else (tsum + s1, tsq + s2)
                tcount += tokens.shape[0] * tokens.shape[1]
        for name, rows in A.encode_views(records, cfg.views).items():
            out[name][:] = rows
        shas, sizes = self.store.write_unit(m, shard, view, out)
        valid = out[A.VALID].astype(bool)
        rec = UnitRecord(
            shard=shard, view=view, url=info.url, count=count, valid=int(valid.sum()),
            correct=int((out[A.PRED_TOP1][valid] == out[A.LABEL][valid]).sum()),
            skipped=skipped, array_sha256=shas, array_bytes=sizes, fidelity=fid,
            tpp_input_sum=None if tsum is None else tsum.tolist(),
            tpp_input_sumsq=None if tsq is None else tsq.tolist(),
            tpp_input_count=tcount, seconds=time.time() - t0,
        )
        self.store.write_unit_record(rec)  # last: its presence means the unit is complete
        return rec

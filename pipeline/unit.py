"""One work unit (input tar, view): stream the tar, sample and apply each view, run the teacher,
encode the targets, write one Zarr shard per array, then the unit's completion record.

:class:`UnitRunner` is what a Ray actor holds: ``__init__`` loads the teacher once, ``__call__``
runs a unit as a chain of stages over :class:`~pipeline.tars.Sample`:

    samples   the tar streamed and decoded, checked against the cache's index of it
    with_view the view record sampled (seeded by recipe seed, tar, position, view) and applied at the
              teacher's input, on a thread pool ahead of the teacher
    mixed     (a recipe with ``views.mix`` only) each view mixed with its partner's own view, see
              :meth:`UnitRunner.mixed`
    batched   batches of ``job.batch_size``; skipped samples are recorded, the others go through the
              teacher and every codec into :class:`UnitRows`
    write     the unit's rows as one whole Zarr shard per array, then its completion record

It works without Ray too (tests, debugging, ``pipeline.job.build_cache_in_process``).
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from functools import partial

import numpy as np
import torch

from storage_schemas import arrays as A
from storage_schemas.codecs import FidelityAcc
from storage_schemas.errors import storage_error
from storage_schemas.manifest import Manifest, SkippedSample, UnitCompletion
from storage_schemas.views import MixRecord

from .stages import batched, prefetch_map
from .store import CacheStore
from .targets import encode_targets, input_fingerprint, to_numpy
from .tars import Sample, iter_samples
from .teacher import Teacher, TeacherOutput
from .views import apply_view, mix_block, mix_views, sample_mix, sample_view


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("job.device is 'cuda' but this worker has no CUDA device")
    return device


class UnitRows:
    """Everything one unit writes, gathered batch by batch: full-unit row buffers in tar order
    (rows of skipped samples keep each array's fill value), the view records, the skipped samples,
    each target's fidelity and the per-channel sums of the TPP tail's input."""

    def __init__(self, m: Manifest, tar: int, teacher: Teacher) -> None:
        self.m, self.tar, self.teacher = m, tar, teacher
        self.codecs = m.codecs()
        count = m.dataset.shards[tar].count
        self.out = {n: np.full((count, *a.shape[2:]), a.fill, dtype=a.dtype) for n, a in m.arrays.items()}
        self.records: list = [None] * count
        self.skipped: list[SkippedSample] = []
        self.fidelity: dict[str, FidelityAcc] = {}
        self.tail_sum = self.tail_sumsq = None
        self.tail_count = 0

    def skip(self, s: Sample) -> None:
        url = self.m.dataset.shards[self.tar].url
        self.skipped.append(SkippedSample(shard=self.tar, url=url, key=s.key, reason=s.skip_reason))

    def add(self, good: list[Sample], x: torch.Tensor, out: TeacherOutput) -> None:
        """The teacher's output ``out`` on the views ``x`` [B, 3, H, W] of samples ``good``."""
        rows, fid = encode_targets(out, self.codecs)
        rows[A.VIEW_FINGERPRINT] = input_fingerprint(x, self.m.config.targets.fingerprint_size)
        pos = np.array([s.position for s in good])
        for name, r in to_numpy(rows).items():
            self.out[name][pos] = r
        self.out[A.LABEL][pos] = [s.label for s in good]
        self.out[A.VALID][pos] = 1
        for s in good:
            self.records[s.position] = s.record
        for k, acc in fid.items():
            self.fidelity[k] = self.fidelity[k].merge(acc) if k in self.fidelity else acc
        if out.tail_input is not None:
            tokens = out.tail_input[:, self.teacher.num_prefix_tokens:].double()
            s1, s2 = tokens.sum((0, 1)), (tokens * tokens).sum((0, 1))
            if self.tail_sum is None:
                self.tail_sum, self.tail_sumsq = s1, s2
            else:
                self.tail_sum, self.tail_sumsq = self.tail_sum + s1, self.tail_sumsq + s2
            self.tail_count += tokens.shape[0] * tokens.shape[1]

    def arrays(self) -> dict[str, np.ndarray]:
        for name, rows in A.encode_views(self.records, self.m.config.views).items():
            self.out[name][:] = rows
        return self.out

    def completion(self, view: int, shas: dict[str, str], sizes: dict[str, int], seconds: float) -> UnitCompletion:
        info = self.m.dataset.shards[self.tar]
        valid = self.out[A.VALID].astype(bool)
        return UnitCompletion(
            shard=self.tar, view=view, url=info.url, count=info.count, valid=int(valid.sum()),
            correct=int((self.out[A.PRED_TOP1][valid] == self.out[A.LABEL][valid]).sum()),
            skipped=self.skipped, array_sha256=shas, array_bytes=sizes, fidelity=self.fidelity,
            tpp_input_sum=None if self.tail_sum is None else self.tail_sum.tolist(),
            tpp_input_sumsq=None if self.tail_sumsq is None else self.tail_sumsq.tolist(),
            tpp_input_count=self.tail_count, seconds=seconds,
        )


class UnitRunner:
    """Holds the teacher and the open store; ``runner(tar, view)`` caches one unit."""

    def __init__(self, url: str, secrets: dict[str, dict], *, num_threads: int | None = None,
                 manifest: Manifest | None = None) -> None:
        self.store = CacheStore(url, secrets.get("output"))
        # the layout being written: the job passes it (during a growth it is not the stored manifest yet)
        self.m = manifest or self.store.read_manifest(allow_partial=True)
        self.cfg = self.m.config.with_secrets(secrets)
        if num_threads:
            torch.set_num_threads(num_threads)
        self.threads = num_threads or 1
        self.teacher = Teacher.from_manifest(self.m, storage_options=secrets.get("checkpoint"),
                                             device=resolve_device(self.cfg.job.device), where=url)

    def samples(self, tar: int) -> Iterator[Sample]:
        """The tar's samples, decoded, checked against the index the cache was laid out by."""
        return iter_samples(self.m.dataset.shards[tar].url, self.cfg.input.storage_options,
                            on_bad_sample=self.cfg.input.on_bad_sample, num_classes=self.m.teacher.num_classes,
                            keys=self.store.read_index(tar), tar=tar)

    def with_view(self, s: Sample, view: int) -> Sample:
        """``s`` with view ``view``'s record sampled and applied at the teacher's input (skipped samples as they are).
        The record's mix, if any, is applied later (:meth:`mixed`): it needs the partner's view."""
        if s.image is None:
            return s
        recipe = self.cfg.views
        # sample_view's fields are float32-exact, so this record is exactly what gets stored
        # and what a student replays (tests/pipeline/test_views.py checks the round trip).
        count = self.m.dataset.shards[s.tar].count if recipe.mix is not None else None
        rec = sample_view(recipe, tar=s.tar, position=s.position, view=view, width=s.image.width,
                          height=s.image.height, count=count)
        x = apply_view(s.image, rec, recipe, size=self.teacher.input_size, mean=self.teacher.mean, std=self.teacher.std)
        return dataclasses.replace(s, view=view, record=rec, x=x)

    def mixed(self, viewed: Iterator[Sample], tar: int, view: int) -> Iterator[Sample]:
        """Mixed views (``views.mix``): each sample's view mixed with its partner's own view of ``view``
        (:func:`~pipeline.views.mix_views`), yielded as soon as both are at hand, in an order fixed by the tar.

        Partners are drawn over the positions of the sample's block (:func:`~pipeline.views.mix_block`:
        ``window`` positions of the cache's index; which samples are bad is known only once decoded); a view
        whose partner turns out skipped, or missing from a truncated tar, is cached unmixed and its record says
        so (mode ``none``). Samples arrive in tar order and partners never leave their block, so when the stream
        enters a block the previous one is done: its views still waiting had a partner the tar did not deliver,
        and none of its views is wanted any more.

        Memory: within the current block, the own views some later sample still wants as partner and the views
        waiting for a partner not yet decoded, both known from the records, which
        :func:`~pipeline.views.sample_mix` draws without the images. A sample's own view is one tensor whether
        held, waiting or both, so this stage holds at most ``window`` views (128 by default: about 77 MB at
        224 px in float32), whatever the tar's size. Measured as own views alive at once on a 1,250-sample tar
        with window 128: a peak of 53 at prob 1 (38 at prob 0.5), against 468 with partners drawn over the whole
        tar (window >= count). The prefetch lookahead before this stage and the batch after it come on top, as
        for unmixed views.
        """
        count, window = self.m.dataset.shards[tar].count, self.cfg.views.mix.window
        block, drawn = range(0), {}
        wanted: Counter = Counter()  # position -> how many samples of the block still want its view
        held: dict[int, torch.Tensor] = {}  # position -> its own view, while a sample still wants it as partner
        waiting: dict[int, list[Sample]] = defaultdict(list)  # partner position -> samples waiting for it
        bad: set[int] = set()

        def release(q: int) -> None:
            wanted[q] -= 1
            if wanted[q] == 0:
                held.pop(q, None)

        def mix(s: Sample, partner_x: torch.Tensor | None) -> Sample:
            release(s.record.mix.partner)
            if partner_x is None:  # the partner is bad or missing: unmixed, and the record says so
                return dataclasses.replace(s, record=s.record.model_copy(update={"mix": MixRecord()}))
            return dataclasses.replace(s, x=mix_views(s.x, partner_x, s.record.mix))

        def close_block() -> Iterator[Sample]:
            for q in sorted(waiting):  # partners the tar did not deliver
                yield from (mix(w, None) for w in waiting[q])
            waiting.clear()
            held.clear()
            bad.clear()

        for s in viewed:
            p = s.position
            if p not in block:
                yield from close_block()
                block = mix_block(p, count, window)
                drawn = {q: sample_mix(self.cfg.views, tar=tar, position=q, view=view, count=count) for q in block}
                wanted.clear()
                wanted.update(m.partner for m in drawn.values() if m.mode != "none")
            if s.image is None:
                bad.add(p)
                if drawn[p].mode != "none":  # a skipped sample needs no partner
                    release(drawn[p].partner)
                yield s
                yield from (mix(w, None) for w in waiting.pop(p, []))
                continue
            own = s.x
            if wanted[p]:
                held[p] = own
            q = s.record.mix.partner
            if s.record.mix.mode == "none":
                yield s
            elif q in bad:
                yield mix(s, None)
            elif q in held:
                yield mix(s, held[q])
            else:
                waiting[q].append(s)
            yield from (mix(w, own) for w in waiting.pop(p, []))
        yield from close_block()

    def __call__(self, tar: int, view: int) -> UnitCompletion:
        """Cache unit (``tar``, ``view``): its arrays, then its completion record. A write the store refuses
        (no space, no permission, a quota) is a :class:`~storage_schemas.errors.CacheError` naming the unit; the
        unit then has no record and a rerun redoes it."""
        try:
            return self._run(tar, view)
        except OSError as e:
            err = storage_error(e, where=f"{self.store.url} (unit: tar {tar}, view {view})")
            if err is None:
                raise
            raise err from e

    def _run(self, tar: int, view: int) -> UnitCompletion:
        t0 = time.time()
        acc = UnitRows(self.m, tar, self.teacher)
        viewed = prefetch_map(partial(self.with_view, view=view), self.samples(tar), workers=self.threads,
                              lookahead=2 * self.cfg.job.batch_size)
        if self.cfg.views.mix is not None:
            viewed = self.mixed(viewed, tar, view)
        for batch in batched(viewed, self.cfg.job.batch_size):
            for s in batch:
                if s.image is None:
                    acc.skip(s)
            good = [s for s in batch if s.image is not None]
            if good:
                x = torch.stack([s.x for s in good])
                acc.add(good, x, self.teacher(x, [(self.cfg.views.seed, s.tar, s.position, view) for s in good]))
        shas, sizes = self.store.write_unit(self.m, tar, view, acc.arrays())
        done = acc.completion(view, shas, sizes, time.time() - t0)
        self.store.write_unit_record(done)  # last: its presence means the unit is complete
        return done

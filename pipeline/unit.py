"""Work units (input tar, view), run a tar at a time: stream the tar and decode it once, sample and apply each
view, run the teacher, encode the targets, write one Zarr shard per array and unit, then the unit's completion record.

:class:`UnitRunner` is what a Ray actor holds: ``__init__`` loads the teacher once, :meth:`UnitRunner.run_views`
runs a task (a tar and several of its views; ``runner(tar, view)`` one unit) as a chain of stages over
:class:`~pipeline.tars.Sample`:

    samples   the tar streamed and decoded, once, checked against the cache's index of it
    with_view for each view of the task, the view record sampled (seeded by recipe seed, tar, position, view)
              and applied at the teacher's input, on a thread pool ahead of the teacher
    then per view, as when the unit runs alone:
    MixStage  (a recipe with ``views.mix`` only) each view mixed with its partner's own view
    batches   of ``job.batch_size``; skipped samples are recorded, the others go through the
              teacher and every codec into :class:`UnitRows`
    write     each unit's rows as one whole Zarr shard per array (one writer), then its completion record

Each unit sees the same samples, batches and teacher calls whether its task has one view or many, so it writes
the same bytes (tests/pipeline/test_decode_once.py). It works without Ray too (tests, debugging,
``pipeline.job.build_cache_in_process``).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from storage_schemas import arrays as A
from storage_schemas import layout
from storage_schemas.codecs import FidelityAcc
from storage_schemas.errors import storage_error
from storage_schemas.manifest import Manifest, SkippedSample, UnitCompletion
from storage_schemas.views import MixRecord

from .stages import prefetch_map
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


class MixStage:
    """Mixed views (``views.mix``) of one unit (``tar``, ``view``): :meth:`push` each sample's own view in tar order
    (skipped samples too), get back the samples whose view is now mixed with its partner's own view of ``view``
    (:func:`~pipeline.views.mix_views`), as soon as both are at hand, in an order fixed by the tar; :meth:`close`
    at the end of the tar. Push-driven, so that one pass over a tar can feed a stage per view (decode once).

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
    for unmixed views; with several views decoded at once, one stage per view.
    """

    def __init__(self, recipe, *, tar: int, view: int, count: int) -> None:
        self.recipe, self.tar, self.view, self.count = recipe, tar, view, count
        self.window = recipe.mix.window
        self.block: range = range(0)
        self.drawn: dict[int, MixRecord] = {}
        self.wanted: Counter = Counter()  # position -> how many samples of the block still want its view
        self.held: dict[int, torch.Tensor] = {}  # position -> its own view, while a sample still wants it as partner
        self.waiting: dict[int, list[Sample]] = defaultdict(list)  # partner position -> samples waiting for it
        self.bad: set[int] = set()

    def _release(self, q: int) -> None:
        self.wanted[q] -= 1
        if self.wanted[q] == 0:
            self.held.pop(q, None)

    def _mix(self, s: Sample, partner_x: torch.Tensor | None) -> Sample:
        self._release(s.record.mix.partner)
        if partner_x is None:  # the partner is bad or missing: unmixed, and the record says so
            return dataclasses.replace(s, record=s.record.model_copy(update={"mix": MixRecord()}))
        return dataclasses.replace(s, x=mix_views(s.x, partner_x, s.record.mix))

    def close(self) -> list[Sample]:
        """The current block's views still waiting, unmixed (their partners never came)."""
        out = [self._mix(w, None) for q in sorted(self.waiting) for w in self.waiting[q]]
        self.waiting.clear()
        self.held.clear()
        self.bad.clear()
        return out

    def push(self, s: Sample) -> list[Sample]:
        """Take sample ``s`` (its own view in ``s.x``; ``s.image`` None when skipped); return those now ready."""
        out: list[Sample] = []
        p = s.position
        if p not in self.block:
            out += self.close()
            self.block = mix_block(p, self.count, self.window)
            self.drawn = {q: sample_mix(self.recipe, tar=self.tar, position=q, view=self.view, count=self.count)
                          for q in self.block}
            self.wanted.clear()
            self.wanted.update(m.partner for m in self.drawn.values() if m.mode != "none")
        if s.image is None:
            self.bad.add(p)
            if self.drawn[p].mode != "none":  # a skipped sample needs no partner
                self._release(self.drawn[p].partner)
            out.append(s)
            out += [self._mix(w, None) for w in self.waiting.pop(p, [])]
            return out
        own = s.x
        if self.wanted[p]:
            self.held[p] = own
        q = s.record.mix.partner
        if s.record.mix.mode == "none":
            out.append(s)
        elif q in self.bad:
            out.append(self._mix(s, None))
        elif q in self.held:
            out.append(self._mix(s, self.held[q]))
        else:
            self.waiting[q].append(s)
        out += [self._mix(w, own) for w in self.waiting.pop(p, [])]
        return out


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
        """Mixed views (``views.mix``) of the stream ``viewed`` (view ``view`` of tar ``tar``, in tar order): see
        :class:`MixStage`, which this feeds."""
        stage = MixStage(self.cfg.views, tar=tar, view=view, count=self.m.dataset.shards[tar].count)
        for s in viewed:
            yield from stage.push(s)
        yield from stage.close()

    def __call__(self, tar: int, view: int) -> UnitCompletion:
        """Cache unit (``tar``, ``view``) alone (:meth:`run_views` with one view)."""
        return self.run_views(tar, [view])[0]

    def run_views(self, tar: int, views: Sequence[int], *, skip_done: bool = False) -> list[UnitCompletion]:
        """Cache the units (``tar``, v) of every v in ``views`` from one read and decode of the tar: their arrays,
        then each unit's completion record, unit by unit. ``skip_done``: leave out the units that already have a
        record (a task retried after its worker was lost: the units it finished stay as they are).

        A write the store refuses (no space, no permission, a quota) is a
        :class:`~storage_schemas.errors.CacheError` naming the unit; that unit then has no record and a rerun redoes
        it (with the task's other units that have none)."""
        views = list(views)
        if skip_done:
            views = [v for v in views if not self.store.exists(layout.unit_record_path(tar, v))]
        if not views:
            return []
        where = f"{self.store.url} (units: tar {tar}, views {', '.join(map(str, views))})"
        try:
            return self._run(tar, views)
        except OSError as e:
            err = storage_error(e, where=where)
            if err is None:
                raise
            raise err from e

    def _run(self, tar: int, views: list[int]) -> list[UnitCompletion]:
        """Decode once, view many times: each decoded sample is viewed for every view of the task on the thread pool
        (pairs (sample, view), in tar order), and each view's stream goes on, as the one-view pipeline's did, into
        its own mixing stage, batches and :class:`UnitRows`. So every unit sees the same samples, batches and
        teacher calls as when run alone, and writes the same bytes.

        Memory on top of one unit run alone: a full-unit row buffer per view (what :func:`~pipeline.plan.plan_tasks`
        bounds), a batch and a mixing stage per view, and a lookahead of ``2 x batch_size`` views per view; a decoded
        image stays alive only while one of its views is in flight (in the lookahead, a batch, or waiting in a mixing
        stage for its partner), never the whole tar."""
        t0 = time.time()
        bs = self.cfg.job.batch_size
        units = {v: _UnitState(UnitRows(self.m, tar, self.teacher),
                               MixStage(self.cfg.views, tar=tar, view=v, count=self.m.dataset.shards[tar].count)
                               if self.cfg.views.mix is not None else None) for v in views}
        pairs = ((s, v) for s in self.samples(tar) for v in views)
        viewed = prefetch_map(lambda sv: self.with_view(*sv), pairs, workers=self.threads,
                              lookahead=2 * bs * len(views))
        for v, s in zip(itertools.cycle(views), viewed):
            u = units[v]
            for ready in (u.mix.push(s) if u.mix else (s,)):
                u.batch.append(ready)
                if len(u.batch) == bs:
                    self._flush(u, v)
        for v, u in units.items():
            if u.mix:
                for ready in u.mix.close():
                    u.batch.append(ready)
                    if len(u.batch) == bs:
                        self._flush(u, v)
            self._flush(u, v)
        done = []
        seconds = (time.time() - t0) / len(views)  # the units share the read and decode: an equal share each
        for v in views:
            u = units.pop(v)  # its row buffers go once written
            shas, sizes = self.store.write_unit(self.m, tar, v, u.acc.arrays())
            rec = u.acc.completion(v, shas, sizes, seconds)
            self.store.write_unit_record(rec)  # last: its presence means the unit is complete
            done.append(rec)
        return done

    def _flush(self, u: _UnitState, view: int) -> None:
        """The batch gathered for ``view``: skipped samples recorded, the others through the teacher into its rows."""
        batch, u.batch = u.batch, []
        for s in batch:
            if s.image is None:
                u.acc.skip(s)
        good = [s for s in batch if s.image is not None]
        if good:
            x = torch.stack([s.x for s in good])
            u.acc.add(good, x, self.teacher(x, [(self.cfg.views.seed, s.tar, s.position, view) for s in good]))


@dataclasses.dataclass
class _UnitState:
    """One unit of a task while its tar streams: its rows, its mixing stage (``views.mix`` only) and its batch."""

    acc: UnitRows
    mix: MixStage | None
    batch: list[Sample] = dataclasses.field(default_factory=list)

"""The student's stream stages: image tars and cache rows in lockstep, reordered as planned, views replayed.

Each stage is a plain function over :class:`~pipeline.tars.Sample` (the type the caching job uses
too), testable on its own:

    load_rows  one tar of the epoch: its index keys and cache rows, one contiguous read per unit
               (large target arrays, e.g. ViTKD taps: a Zarr chunk of rows at a time, :class:`BlockRows`)
    lockstep   the tar's samples zipped with their rows (``Sample.rows``); rows not cached dropped,
               labels checked against the cache
    with_partners  (mixed views, ``views.mix``) each sample's view record, and its mix partner's image
               and record (``Sample.partner``), in tar order, from one block of the tar at a time
    reorder    the planned shuffle order (:mod:`student.plan`) over the lockstep stream, holding at
               most the shuffle buffer; tars with nothing wanted are not read
    replay     the sample's stored view record (or a fresh one) applied at the student's input
               (``x``) and, for an online teacher, at the teacher's (``x_teacher``)

Memory: ``reorder`` holds the items the planned order has not reached yet (bounded by the shuffle
buffer) and the rows of the tars being streamed (the tar read ahead too); each sample's ``rows`` are
views into its tar's rows, not copies. Large target arrays are read by the block, not the tar, each
sample's rows straight into a buffer of its own: the buffer's samples' rows, plus three blocks per tar loaded
(the one streamed and two read ahead). For
three ViT-L taps (1.2 MB a sample) and 64-row chunks that is about the buffer's own rows (1,024 samples:
1.2 GB) plus ~0.45 GB, where whole units of ImageNet's 1,250-sample tars were 1.5 GB each and every tar
stayed alive until the buffer let go of its last sample. With mixed views ``with_partners`` adds one block of decoded samples (at most
``views.mix.window``, 128 by default) and each sample in the shuffle buffer keeps its partner's
decoded image alive: at most twice the buffer's images, plus the block.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple

import numpy as np

from pipeline.buffers import packed
from pipeline.stages import prefetch_map
from pipeline.store import CacheStore
from pipeline.tars import BadSampleError, BadTarError, Sample, iter_samples
from pipeline.views import mix_block, replay_view, sample_view
from storage_schemas import arrays as A
from storage_schemas.errors import CacheError
from storage_schemas.manifest import Manifest
from storage_schemas.views import NO_PARTNER, ViewRecipe, ViewRecord

from .plan import Task, random_views

WHOLE_UNIT_BYTES = 16 * 2**20  # a target array whose unit is larger is read a Zarr chunk of rows at a time


class Loaded(NamedTuple):
    """What :func:`load_rows` reads of one tar for the epoch."""

    keys: list[str]  # the index: each position's sample key
    rows: dict[str, np.ndarray]  # arrays read whole, rows [count, ...] of each position's view
    views: np.ndarray  # the view of each position
    records: dict[int, dict[str, np.ndarray]]  # per view read, its unit's view-record arrays [count, ...]
    blocks: BlockRows | None  # the large target arrays, read by blocks as the stream reaches them


def _gather(store: CacheStore, m: Manifest, tar: int, views: np.ndarray, names: Sequence[str]
            ) -> tuple[dict[str, np.ndarray], dict[int, dict[str, np.ndarray]]]:
    """Rows of ``names``, each position's from the unit of its view in ``views`` (each unit read once, one
    contiguous read), and the rows each unit read gave, by view."""
    units = {int(v): store.read_unit(m, tar, int(v), list(names)) for v in np.unique(views)}
    if len(units) == 1:
        return next(iter(units.values())), units
    rows: dict[str, np.ndarray] = {}
    for v, unit in units.items():
        sel = views == v
        for name, arr in unit.items():
            if name not in rows:
                rows[name] = np.empty_like(arr)
            rows[name][sel] = arr[sel]
    return rows, units


class BlockRows:
    """Rows of the target arrays too large to hold for a whole tar (``WHOLE_UNIT_BYTES``: at ImageNet's
    ~1,250 samples a tar, three ViT-L ViTKD taps are 1.5 GB a unit), read one Zarr chunk of rows
    (``chunk_rows``) at a time as the tar's stream reaches it, the next block read ahead on a thread (which
    hides an object store's latency). The first block is read with the tar's other rows, in the loading
    thread, and the second is read meanwhile.

    Each sample's rows (of every array) land in one buffer of its own (the store's
    :class:`~pipeline.buffers.ReusedBuffers`, one per process, shared by the tars a worker reads), which comes
    back once the sample's rows are gone; an uncompressed array's rows are read from its shard straight into
    them (:meth:`pipeline.raw_shards.RawShard.rows_into`), a compressed one's copied in from Zarr's block. Not
    views into a block: a shuffle buffer lets a few samples of each block linger for thousands of draws (each
    draw takes a random one of its 1,024), and a view would keep their whole block alive with them: ~66 blocks of
    64 ViT-L rows, 5.4 GB, measured by ``python -m bench.reader_memory``, against 5.6 GB for whole units. Read
    straight into the samples' buffers rather than into a block buffer and then copied out sample by sample
    (until 2026-12-02), the rows cost one pass over their bytes less: ``BlockRows`` over ViT-L's three taps from
    the page cache, every sample's rows taken, 0.71 → 0.32 ms of CPU a sample (8 interleaved processes of each
    code × 3 epochs, scratch /tmp/s23/blocks_ab.py); in the reader (2 workers), the ViTKD rows' worker CPU 0.76
    → 0.40 ms a sample (6 interleaved rounds, scratch /tmp/s23/reader_ab.py)."""

    def __init__(self, store: CacheStore, m: Manifest, tar: int, views: np.ndarray, names: Sequence[str]) -> None:
        count, step = len(views), m.chunk_rows
        arrays = {name: store.array(name) for name in names}
        layout = {name: (a.dtype, tuple(a.shape[2:]), a.dtype.itemsize * math.prod(a.shape[2:]))
                  for name, a in arrays.items()}
        starts, size = packed([nb for _, _, nb in layout.values()])  # a sample's rows, packed as copies() packs
        offsets = dict(zip(layout, starts, strict=True))

        def read(lo: int) -> tuple[int, list[dict[str, np.ndarray]]]:
            hi = min(lo + step, count)
            mems = [store.row_buffers.lend(size) for _ in range(lo, hi)]
            dests = {name: [mem[offsets[name]:offsets[name] + nb] for mem in mems]
                     for name, (_, _, nb) in layout.items()}
            drawn = views[lo:hi]
            for v in np.unique(drawn):
                for name in names:
                    mine = [d if w == v else None for d, w in zip(dests[name], drawn, strict=True)]
                    raw = store.raw_shard(tar, int(v), name)
                    if raw is not None:
                        raw.rows_into(lo, hi, mine)
                        continue
                    rows = store.read_unit(m, tar, int(v), [name], lo, hi)[name]  # compressed: Zarr's block
                    for d, row in zip(mine, rows, strict=True):
                        if d is not None:
                            d.view(row.dtype)[...] = row.reshape(-1)
            return lo, [{name: dests[name][i].view(dt).reshape(shape) for name, (dt, shape, _) in layout.items()}
                        for i in range(hi - lo)]

        self._blocks = prefetch_map(read, range(0, count, step), workers=1, lookahead=2)
        self._lo, self._rows = next(self._blocks)  # the first block; the second is read meanwhile

    def at(self, position: int) -> dict[str, np.ndarray]:
        """Each array's row at ``position``; positions must not decrease (the tar's order)."""
        if position < self._lo:
            raise ValueError(f"position {position} is before the block read ({self._lo}..)")
        while position >= self._lo + len(self._rows):
            self._lo, self._rows = next(self._blocks)
        return self._rows[position - self._lo]

    def close(self) -> None:
        """The tar's stream has passed its last sample: nothing here keeps its rows any more."""
        self._rows = []


def load_rows(store: CacheStore, m: Manifest, task: Task, names: Sequence[str], *, random_policy: bool, seed: int,
              epoch: int) -> Loaded:
    """Index keys, rows ``[count, ...]`` of ``names`` and the view of each position, for one tar; each unit
    is read once (policy ``random`` gathers each position's drawn view from the units it reads). Also, per
    view read, that unit's view-record arrays among ``names`` for every position: a mixed view's partner is
    replayed by its record of the *same* view, which under policy ``random`` need not be the view the
    partner itself is drawn with this epoch (a few bytes per position and view). A target array whose unit
    exceeds ``WHOLE_UNIT_BYTES`` is not read here but by :class:`BlockRows`, a chunk at a time."""
    t = task.tar
    count = m.dataset.shards[t].count
    keys = store.read_index(t)
    if random_policy and len(task.views) > 1:
        views = random_views(seed, epoch, t, count, task.views)
    else:
        views = np.full(count, task.views[0])
    kept = {A.LABEL, A.VALID, *A.VIEW_RECORD_ARRAYS}
    large = [n for n in names if n not in kept and count * m.arrays[n].row_bytes > WHOLE_UNIT_BYTES]
    rows, units = _gather(store, m, t, views, [n for n in names if n not in large])
    records = {v: {n: unit[n] for n in A.VIEW_RECORD_ARRAYS if n in unit} for v, unit in units.items()}
    return Loaded(keys, rows, views, records, BlockRows(store, m, t, views, large) if large else None)


def lockstep(m: Manifest, task: Task, loaded: Loaded, *, storage_options: dict | None) -> Iterator[Sample]:
    """The tar's cached samples in tar order, each with its view index and rows; a sample the cache holds
    but the tar no longer yields as cached (unreadable, relabelled, missing) fails naming tar and key."""
    keys, rows, views, _, blocks = loaded
    url = m.dataset.shards[task.tar].url
    valid, labels = rows[A.VALID], rows[A.LABEL]
    n = 0
    for s in iter_samples(url, storage_options, on_bad_sample=m.config.input.on_bad_sample,
                          num_classes=m.teacher.num_classes, keys=keys, tar=task.tar):
        p = s.position
        if not valid[p]:
            continue
        if s.image is None:
            raise BadSampleError(url, s.key, f"cached (valid row {p}, view {views[p]}) but unreadable now: "
                                             f"{s.skip_reason}")
        if s.label != labels[p]:
            raise BadSampleError(url, s.key, f"label {s.label} in the tar, {labels[p]} in the cache "
                                             f"(row {p}, view {views[p]})")
        n += 1
        row = {name: a[p] for name, a in rows.items()}
        if blocks is not None:
            row |= blocks.at(p)
        yield dataclasses.replace(s, view=int(views[p]), rows=row)
    if blocks is not None:
        blocks.close()
    if n != task.n:
        raise BadTarError(url, f"{n} cached samples streamed, the cache records {task.n}")


def with_partners(samples: Iterable[Sample], *, count: int, window: int,
                  record_of: Callable[[Sample, int], ViewRecord], where: str) -> Iterator[Sample]:
    """Mixed views (``views.mix``): each sample of one tar's stream, in the order it came, with its view
    record (``record``, ``record_of(sample, sample.view)``) and, when that record is mixed, its partner
    (``partner``: the partner sample, ``record`` set to ``record_of(partner, sample.view)``, the partner's own
    record of the same view index, which :func:`pipeline.views.replay_view` mixes with).

    Partners never leave their block (:func:`pipeline.views.mix_block`: the aligned ``window`` positions of
    the tar), so the stage holds the samples of one block, decoded, until the stream enters the next block
    (or ends), then yields them: at most ``window`` decoded samples (128 by default: about 72 MB of
    ImageNet-sized RGB images) whatever the tar's size. What it yields keeps its partner's image alive (a
    reference, not a copy) until the sample is replayed. A mixed record whose partner is not among the
    block's samples (not cached as valid, or outside the block) means the cache and the tar disagree: a
    :class:`~storage_schemas.errors.CacheError` naming tar, key and partner.
    """
    block, held = range(0), []

    def flush() -> Iterator[Sample]:
        by_position = {h.position: h for h in held}
        for h in held:
            mix = h.record.mix
            if mix is not None and mix.mode != "none" and mix.partner != NO_PARTNER:
                q = by_position.get(mix.partner)
                if q is None:
                    raise CacheError(f"{where}: key {h.key} (position {h.position}, view {h.view}) is cached "
                                     f"mixed with position {mix.partner}, which the tar's block "
                                     f"{block.start}..{block.stop - 1} does not hold as a cached sample; the "
                                     "cache does not match the tar")
                partner = dataclasses.replace(q, record=record_of(q, h.view), rows=None, x=None, x_teacher=None,
                                              partner=None)
                h = dataclasses.replace(h, partner=partner)
            yield h
        held.clear()

    for s in samples:
        if s.position not in block:
            yield from flush()
            block = mix_block(s.position, count, window)
        held.append(dataclasses.replace(s, record=record_of(s, s.view)))
    yield from flush()


def reorder(tasks: list[Task], order: np.ndarray, load: Callable[[Task], Loaded],
            stream: Callable[[Task, Loaded], Iterator[Sample]], *, where: str) -> Iterator[Sample]:
    """The lockstep streams of ``tasks`` (``load`` read ahead by one tar on a thread), reordered by ``order``
    (indices into their concatenation); items not in ``order`` are dropped, tars with none of it not read."""
    if len(order) == 0:
        return
    total = sum(t.n for t in tasks)
    wanted = np.zeros(total, bool)
    wanted[order] = True
    starts = np.cumsum([0] + [t.n for t in tasks])
    todo = [(t, int(s)) for t, s in zip(tasks, starts[:-1], strict=True) if wanted[s:s + t.n].any()]
    pending: dict[int, Sample] = {}
    k = 0
    loaded = prefetch_map(lambda job: load(job[0]), todo, workers=1, lookahead=2)
    for (task, start), rows in zip(todo, loaded, strict=True):
        for j, item in enumerate(stream(task, rows)):
            if wanted[start + j]:
                pending[start + j] = item
            while k < len(order) and order[k] in pending:
                yield pending.pop(int(order[k]))
                k += 1
    if k != len(order):  # cannot happen unless the counts lied; fail rather than lose samples
        raise RuntimeError(f"{where}: planned {len(order)} samples, streamed {k}")


def replay(s: Sample, recipe: ViewRecipe, *, size: int | tuple[int, int], mean: tuple, std: tuple,
           teacher_input: tuple[int, tuple, tuple] | None = None, fresh_view: int | None = None) -> Sample:
    """``s`` with its view replayed at ``size`` (``x``) and, given ``teacher_input=(size, mean, std)``, at the
    teacher's input too (``x_teacher``), by :func:`pipeline.views.replay_view`: a mixed view is mixed with
    ``s.partner`` as the caching job mixed it. The view is ``s.record`` when a stage set it (mixed views:
    :func:`with_partners`), else the stored record (``Sample.rows``), or with ``fresh_view`` a new record drawn
    for that view index (never cached, reproducible; an unmixed recipe: a mixed one draws in
    :func:`with_partners`, which knows the tar)."""
    if s.record is not None:
        record = s.record
    elif fresh_view is not None:
        record = sample_view(recipe, tar=s.tar, position=s.position, view=fresh_view, width=s.image.width,
                             height=s.image.height)
    else:
        record = A.decode_view(s.rows, None)
    partner = (s.partner.image, s.partner.record) if s.partner is not None else None
    x = replay_view(s.image, record, recipe, size=size, mean=mean, std=std, partner=partner)
    x_teacher = None
    if teacher_input is not None:
        t_size, t_mean, t_std = teacher_input
        x_teacher = replay_view(s.image, record, recipe, size=t_size, mean=t_mean, std=t_std, partner=partner)
    return dataclasses.replace(s, record=record, x=x, x_teacher=x_teacher)

"""The student's stream stages: image tars and cache rows in lockstep, reordered as planned, views replayed.

Each stage is a plain function over :class:`~pipeline.tars.Sample` (the type the caching job uses
too), testable on its own:

    load_rows  one tar of the epoch: its index keys and cache rows, one contiguous read per unit
    lockstep   the tar's samples zipped with their rows (``Sample.rows``); rows not cached dropped,
               labels checked against the cache
    with_partners  (mixed views, ``views.mix``) each sample's view record, and its mix partner's image
               and record (``Sample.partner``), in tar order, from one block of the tar at a time
    reorder    the planned shuffle order (:mod:`student.plan`) over the lockstep stream, holding at
               most the shuffle buffer; tars with nothing wanted are not read
    replay     the sample's stored view record (or a fresh one) applied at the student's input
               (``x``) and, for an online teacher, at the teacher's (``x_teacher``)

Memory: ``reorder`` holds the items the planned order has not reached yet (bounded by the shuffle
buffer) and the rows of the tars being streamed; each sample's ``rows`` are views into its tar's
rows, not copies. With mixed views ``with_partners`` adds one block of decoded samples (at most
``views.mix.window``, 128 by default) and each sample in the shuffle buffer keeps its partner's
decoded image alive: at most twice the buffer's images, plus the block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from pipeline.store import CacheStore
from pipeline.tars import BadSampleError, BadTarError, Sample, iter_samples
from pipeline.views import mix_block, replay_view, sample_view
from storage_schemas import arrays as A
from storage_schemas.errors import CacheError
from storage_schemas.manifest import Manifest
from storage_schemas.views import NO_PARTNER, ViewRecipe, ViewRecord

from .plan import Task, random_views

# index keys, rows [count, ...], view per position, and per view read the view-record arrays of its unit [count, ...]
Loaded = tuple[list[str], dict[str, np.ndarray], np.ndarray, dict[int, dict[str, np.ndarray]]]


def load_rows(store: CacheStore, m: Manifest, task: Task, names: Sequence[str], *, random_policy: bool, seed: int,
              epoch: int) -> Loaded:
    """Index keys, rows ``[count, ...]`` of ``names`` and the view of each position, for one tar; each unit
    is read once (policy ``random`` gathers each position's drawn view from the units it reads). Also, per
    view read, that unit's view-record arrays among ``names`` for every position: a mixed view's partner is
    replayed by its record of the *same* view, which under policy ``random`` need not be the view the
    partner itself is drawn with this epoch (a few bytes per position and view)."""
    t = task.tar
    count = m.dataset.shards[t].count
    keys = store.read_index(t)
    if not random_policy or len(task.views) == 1:
        v = task.views[0]
        rows = store.read_unit(m, t, v, list(names))
        return keys, rows, np.full(count, v), {v: rows}
    views = random_views(seed, epoch, t, count, task.views)
    rows: dict[str, np.ndarray] = {}
    records: dict[int, dict[str, np.ndarray]] = {}
    for v in np.unique(views):
        unit = store.read_unit(m, t, int(v), list(names))
        sel = views == v
        for name, arr in unit.items():
            if name not in rows:
                rows[name] = np.empty_like(arr)
            rows[name][sel] = arr[sel]
        records[int(v)] = {n: unit[n] for n in A.VIEW_RECORD_ARRAYS if n in unit}
    return keys, rows, views, records


def lockstep(m: Manifest, task: Task, loaded: Loaded, *, storage_options: dict | None) -> Iterator[Sample]:
    """The tar's cached samples in tar order, each with its view index and rows; a sample the cache holds
    but the tar no longer yields as cached (unreadable, relabelled, missing) fails naming tar and key."""
    keys, rows, views, _ = loaded
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
        yield dataclasses.replace(s, view=int(views[p]), rows={name: a[p] for name, a in rows.items()})
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
    from pipeline.stages import prefetch_map

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

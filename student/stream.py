"""The student's stream stages: image tars and cache rows in lockstep, reordered as planned, views replayed.

Each stage is a plain function over :class:`~pipeline.tars.Sample` (the type the caching job uses
too), testable on its own:

    load_rows  one tar of the epoch: its index keys and cache rows, one contiguous read per unit
    lockstep   the tar's samples zipped with their rows (``Sample.rows``); rows not cached dropped,
               labels checked against the cache
    reorder    the planned shuffle order (:mod:`student.plan`) over the lockstep stream, holding at
               most the shuffle buffer; tars with nothing wanted are not read
    replay     the sample's stored view record (or a fresh one) applied at the student's input
               (``x``) and, for an online teacher, at the teacher's (``x_teacher``)

Memory: ``reorder`` holds the items the planned order has not reached yet (bounded by the shuffle
buffer) and the rows of the tars being streamed; each sample's ``rows`` are views into its tar's
rows, not copies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from pipeline.store import CacheStore
from pipeline.tars import BadSampleError, BadTarError, Sample, iter_samples
from pipeline.views import apply_view, sample_view
from storage_schemas import arrays as A
from storage_schemas.manifest import Manifest
from storage_schemas.views import ViewRecipe

from .plan import Task, random_views

Loaded = tuple[list[str], dict[str, np.ndarray], np.ndarray]  # index keys, rows [count, ...], view per position


def load_rows(store: CacheStore, m: Manifest, task: Task, names: Sequence[str], *, random_policy: bool, seed: int,
              epoch: int) -> Loaded:
    """Index keys, rows ``[count, ...]`` of ``names`` and the view of each position, for one tar; each unit
    is read once (policy ``random`` gathers each position's drawn view from the units it reads)."""
    t = task.tar
    count = m.dataset.shards[t].count
    keys = store.read_index(t)
    if not random_policy or len(task.views) == 1:
        v = task.views[0]
        return keys, store.read_unit(m, t, v, list(names)), np.full(count, v)
    views = random_views(seed, epoch, t, count, task.views)
    rows: dict[str, np.ndarray] = {}
    for v in np.unique(views):
        unit = store.read_unit(m, t, int(v), list(names))
        sel = views == v
        for name, arr in unit.items():
            if name not in rows:
                rows[name] = np.empty_like(arr)
            rows[name][sel] = arr[sel]
    return keys, rows, views


def lockstep(m: Manifest, task: Task, loaded: Loaded, *, storage_options: dict | None) -> Iterator[Sample]:
    """The tar's cached samples in tar order, each with its view index and rows; a sample the cache holds
    but the tar no longer yields as cached (unreadable, relabelled, missing) fails naming tar and key."""
    keys, rows, views = loaded
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
    """``s`` with its view applied at ``size`` (``x``) and, given ``teacher_input=(size, mean, std)``, at the
    teacher's input too (``x_teacher``). The view is the stored record (``Sample.rows``), or with
    ``fresh_view`` a new record drawn for that view index (never cached, reproducible)."""
    if fresh_view is not None:
        # fresh views are drawn unmixed: mixing needs the partner's image, which this per-sample stage has not
        # (issue 14, item 3); the online teacher sees the same unmixed view, so the pair stays consistent
        record = sample_view(recipe.model_copy(update={"mix": None}), tar=s.tar, position=s.position, view=fresh_view, width=s.image.width,
                             height=s.image.height)
    else:
        record = A.decode_view(s.rows, None)
    x = apply_view(s.image, record, recipe, size=size, mean=mean, std=std)
    x_teacher = None
    if teacher_input is not None:
        t_size, t_mean, t_std = teacher_input
        x_teacher = apply_view(s.image, record, recipe, size=t_size, mean=t_mean, std=t_std)
    return dataclasses.replace(s, record=record, x=x, x_teacher=x_teacher)

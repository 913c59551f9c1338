"""Student-side data: :class:`CacheDataset`, the image tars and cache rows of an epoch as a torch dataset;
:class:`TarDataset`, plain tars with a fresh view per sample and epoch (supervised training, no cache).

For each work unit (input tar, view) the image tar is streamed with ``pipeline.tars.iter_samples``
(checked against the cache's index keys, so a changed tar fails loudly) and the unit's cache rows
are read in one contiguous read per array (``CacheStore.read_unit``), for only the arrays needed:
the view records, ``label``/``valid`` and the requested targets. Rows with ``valid == 0`` (samples
the caching job skipped) are skipped. Each sample's stored view is replayed with
``pipeline.views.apply_view`` — the one implementation the caching job used — at the student's
resolution, mean and std; a mixed view (``views.mix``) is mixed with its partner of the same tar by
``pipeline.views.replay_view`` (the job's ``mix_views``), the partner taken from the tar's stream one
block of ``views.mix.window`` samples at a time (``student.stream.with_partners``), and its label is
mixed with the recorded λ (``student.batch.mix_labels``). The pieces, each in its own module:

    student.plan    which tars, views and order an epoch reads, per consumer; resume accounting (pure)
    student.stream  the stages: load rows, lockstep with the tar, reorder as planned, replay views
    student.batch   collation in the DataLoader worker, decoding of the targets in the main process

Under DDP each rank counts its own consumers: gather every rank's ``state_dict()``
(``all_gather_object``) and save ``merge_states(...)``. ``set_epoch`` resets the counts;
DataLoader must not use ``persistent_workers`` (workers copy the dataset, epoch and state, when an
iteration starts).

:class:`TarDataset` shares the plan, order, split, resume and replay: each epoch ``e`` it draws view
index ``e`` of every sample from the recipe (seeded by recipe seed, tar, position, ``e``), as a cache
of that recipe would hold it, so a supervised run (the demo's teacher, a no-KD baseline without a
cache) sees fresh, reproducible augmentations.

Caches are opened read-only. A cache whose manifest is not complete is refused unless
``allow_partial=True``; then only the units with a completion record (read once, at construction)
are used: cycle skips a tar whose unit for the epoch's view is missing, random draws among a
tar's completed views.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.stages import prefetch_map
from pipeline.store import CacheStore
from pipeline.tars import Sample, expand_urls, index_tar, iter_samples
from pipeline.views import sample_view, size_pair
from storage_schemas import arrays as A
from storage_schemas.codecs import TokenCodec
from storage_schemas.errors import CacheError, CacheMismatchError, ConfigError
from storage_schemas.manifest import Manifest
from storage_schemas.views import ViewRecipe, ViewRecord

from .batch import ROW, SCALARS, Batch, collate_rows, received, to_batch
from .plan import EpochPlan, EpochProgress, Task, ViewPolicy, merge_states
from .ring import BatchRing, packed_bytes, shm_free_bytes
from .stream import Loaded, load_rows, lockstep, reorder, replay, with_partners

__all__ = ["Batch", "CacheDataset", "TarDataset", "merge_states", "target_arrays"]

log = logging.getLogger(__name__)
PREFETCH_FACTOR = 2  # torch's DataLoader default, which loader() keeps


def target_arrays(m: Manifest, *, logits: bool = True, taps: Sequence[str] = ()) -> list[str]:
    """Cache arrays holding the requested targets: the logits codec's and each tap's."""
    names: list[str] = []
    if logits:
        if m.logits is None:
            raise CacheMismatchError("logits requested but this cache holds none (its targets.logits was off); "
                                     "cache them, or train a method that does not need them")
        names += m.logits.codec().names
    codecs = {c.tap.name: c for c in m.codecs() if isinstance(c, TokenCodec)}
    for tap in taps:
        if tap not in codecs:
            raise CacheMismatchError(f"tap {tap!r} is not in this cache; it holds {sorted(codecs) or 'no taps'}")
        names += codecs[tap].names
    return names


class EpochDataset(IterableDataset):
    """What both datasets share: the epoch plan and its split over ranks and workers (:mod:`student.plan`),
    the position-in-epoch accounting for exact resume, the reordering and replay stages, batching.
    Subclasses set ``plan`` and implement :meth:`_load` / :meth:`_stream` (one tar's samples) and
    :meth:`_replay`."""

    url: str
    plan: EpochPlan
    targets: list[str] = []
    taps: list[str] = []

    def _init_split(self, rank: int | None, world_size: int | None, threads: int, seed: int,
                    view_policy: ViewPolicy) -> None:
        if rank is None or world_size is None:
            ddp = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = rank if rank is not None else (torch.distributed.get_rank() if ddp else 0)
            world_size = world_size if world_size is not None else (torch.distributed.get_world_size() if ddp else 1)
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in [0, world_size={world_size})")
        self.rank, self.world_size, self.threads = rank, world_size, max(1, threads)
        self.progress = EpochProgress(seed=int(seed), view_policy=view_policy, aug_repeats=self.plan.aug_repeats)

    @property
    def epoch(self) -> int:
        return self.progress.epoch

    @property
    def seed(self) -> int:
        return self.plan.seed

    @property
    def view_policy(self) -> ViewPolicy:
        return self.plan.view_policy

    def num_samples(self, num_workers: int = 0) -> int:
        """Samples this rank yields in the current epoch (all its workers), resume skips included."""
        return self.plan.num_samples(self.epoch, self.rank, self.world_size, num_workers)

    # --- epoch and resume state ---------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Select epoch ``epoch`` (its views and order) and forget consumed counts."""
        self.progress = EpochProgress(epoch=int(epoch), seed=self.seed, view_policy=self.view_policy,
                                      aug_repeats=self.plan.aug_repeats)

    def advance(self, batch: Batch) -> None:
        """Count a batch as consumed by the trainer (for :meth:`state_dict`); main process only."""
        self.progress.advance(batch.consumers, batch.num_consumers, self.rank, self.world_size)

    def state_dict(self) -> dict:
        """Position in the epoch: plain JSON-able values (see :class:`student.plan.EpochProgress`)."""
        return self.progress.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state`` (this rank's entries are used; see :func:`student.plan.merge_states`)."""
        self.progress = EpochProgress.from_state(state, seed=self.seed, view_policy=self.view_policy,
                                                 aug_repeats=self.plan.aug_repeats)

    # --- iteration ----------------------------------------------------------------------

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        N, i = (info.num_workers, info.id) if info is not None else (1, 0)
        C = self.world_size * N
        p = self.progress
        if p.num_consumers not in (None, C):
            raise ConfigError(
                f"resume state was taken with {p.num_consumers} consumers (world_size x num_workers), "
                f"this run has {C} ({self.world_size} x {N}); resume with the same world size and workers")
        w = (i + p.next_worker.get(self.rank, 0)) % N  # see "Exact resume" in student.plan
        c = self.rank * N + w
        tasks, order = self.plan.consumer_order(self.epoch, c, C)
        if c == 0 and C > len(self.plan.tasks(self.epoch)):
            log.warning("%d consumers (world_size %d x workers %d) but %d tars this epoch: some stay idle",
                        C, self.world_size, N, len(self.plan.tasks(self.epoch)))
        order = order[p.consumed.get(c, 0):]
        replayed = prefetch_map(self._replay, reorder(tasks, order, self._load, self._stream, where=self.url),
                                workers=self.threads, lookahead=4 * self.threads)
        for s in replayed:
            yield dataclasses.replace(s, consumer=c, num_consumers=C)

    def _load(self, task: Task) -> Any:
        raise NotImplementedError

    def _stream(self, task: Task, loaded: Any) -> Iterator[Sample]:
        raise NotImplementedError

    def _replay(self, s: Sample) -> Sample:
        raise NotImplementedError

    # --- batches ------------------------------------------------------------------------

    def _to_batch(self, raw: dict, device: str | torch.device) -> Batch:
        raise NotImplementedError

    def collate(self, samples: list[Sample] | dict, device: str | torch.device = "cpu") -> Batch:
        """Samples (or :func:`student.batch.collate_rows`' output) → :class:`Batch`, targets decoded."""
        return self._to_batch(samples if isinstance(samples, dict) else collate_rows(samples, self.targets), device)

    def loader(self, batch_size: int, *, num_workers: int = 0, device: str | torch.device = "cpu",
               pin_memory: bool = False, drop_last: bool = False, ring: bool = True) -> Iterator[Batch]:
        """Batches of the current epoch through a DataLoader; targets decoded here, in the main
        process; each batch counted as consumed when it is handed out. With workers and ``ring`` (default) the
        workers hand their batches over through reused shared memory (:mod:`student.ring`; kept for the next
        epoch when this one ran to its end)."""
        with self.batch_ring(batch_size, num_workers) if ring and num_workers > 0 else contextlib.nullcontext() as rg:
            dl = DataLoader(self, batch_size=batch_size, num_workers=num_workers,
                            collate_fn=partial(collate_rows, names=self.targets, ring=rg),
                            pin_memory=pin_memory and rg is None, drop_last=drop_last, persistent_workers=False)
            for raw in dl:
                batch = self.collate(received(raw, rg, device, pin_memory=pin_memory), device=device)
                self.advance(batch)
                yield batch

    def slot_shapes(self, batch_size: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """``name: (shape, dtype)`` of what :func:`student.batch.collate_rows` stacks for a batch: the size of a
        :class:`student.ring.BatchRing` slot."""
        shapes = {"x": ((batch_size, 3, *size_pair(self.size)), "float32")}
        if getattr(self, "teacher_input", None) is not None:
            shapes["x_teacher"] = ((batch_size, 3, *size_pair(self.teacher_input[0])), "float32")
        for n in self.targets:  # only a CacheDataset has targets, and its manifest
            shapes[ROW + n] = ((batch_size, *self.m.arrays[n].shape[2:]), self.m.arrays[n].dtype)
        for n in SCALARS:
            shapes[n] = ((batch_size,), "int64")
        return shapes

    @contextlib.contextmanager
    def batch_ring(self, batch_size: int, num_workers: int) -> Iterator[BatchRing | None]:
        """The shared-memory slots a DataLoader of ``num_workers`` workers hands its batches of up to
        ``batch_size`` over with (:mod:`student.ring`): pass it to :func:`student.batch.collate_rows` and
        :func:`student.batch.received`. ``prefetch_factor + 1`` slots a worker (a worker never waits for a slot
        while the main process takes its batches); those of the last loader when it ran to its end and they fit
        (its workers are gone), else new ones; ``None`` (the DataLoader's usual way) when ``/dev/shm`` has less
        than twice their size free. Kept for the next loader only when the ``with`` block ends normally."""
        slot = packed_bytes(self.slot_shapes(batch_size))
        rg, self._idle_ring = getattr(self, "_idle_ring", None), None
        if rg is None or rg.workers != num_workers or rg.slot_bytes < slot:
            slots = PREFETCH_FACTOR + 1
            free = shm_free_bytes()
            if free is not None and free < 2 * num_workers * slots * slot:
                log.warning("%s: /dev/shm has %.0f MB free, under twice the %.0f MB of reused batch slots; batches "
                            "go through fresh shared memory", self.url, free / 1e6, num_workers * slots * slot / 1e6)
                rg = None
            else:
                rg = BatchRing(num_workers, slots, slot)
        yield rg
        self._idle_ring = rg  # not after an exception or an early stop: a worker may still write into it

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_idle_ring", None)  # the main process's: workers get theirs through the collate_fn
        return state


class CacheDataset(EpochDataset):
    """:class:`~pipeline.tars.Sample`\\ s of one epoch, each replayed (``x``) with its cache rows; see the
    module docstring and :mod:`student.plan` for what an epoch holds and in which order."""

    def __init__(
        self,
        cache: str | CacheStore,
        *,
        size: int | tuple[int, int],
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        logits: bool = True,
        taps: Sequence[str] = (),
        arrays: Sequence[str] | None = None,
        view_policy: ViewPolicy = "cycle",
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1024,
        rank: int | None = None,
        world_size: int | None = None,
        drop_uneven: bool = False,
        allow_partial: bool = False,
        storage_options: dict | None = None,
        input_storage_options: dict | None = None,
        threads: int = 2,
        teacher_input: tuple[int, tuple, tuple] | None = None,
        fresh_views: bool = False,
        max_views: int | None = None,
        aug_repeats: int = 1,
    ) -> None:
        """``arrays`` (target array names) overrides ``logits``/``taps``; ``storage_options`` are
        the cache's fsspec options, ``input_storage_options`` the image tars'.

        For the online teacher (``--online-teacher``): ``teacher_input=(size, mean, std)`` also
        replays each view at the teacher's input as ``x_teacher``; ``fresh_views`` replaces the
        stored record by a new one drawn for view index ``num_views + epoch`` (never cached,
        reproducible): the fresh-views upper bound that finitely many cached views approximate. A cache
        of mixed views draws fresh mixed views from its recipe, partners among its cached samples.
        ``max_views`` trains on the first N cached views only: view v of a sample is seeded by
        (seed, tar, position, v), so that is exactly what a cache of N views would hold. ``aug_repeats``
        (repeated augmentation, policy cycle): every sample ``aug_repeats`` times per epoch, each through
        another cached view (see :mod:`student.plan`)."""
        if view_policy not in ("cycle", "random"):
            raise ConfigError(f"view_policy must be 'cycle' or 'random', not {view_policy!r}")
        if isinstance(cache, CacheStore):
            cache, storage_options = cache.url, cache.storage_options
        self.url, self.storage_options = cache, dict(storage_options or {})
        self.input_storage_options = dict(input_storage_options or {})
        store = CacheStore(self.url, self.storage_options, read_only=True)
        self.m = store.read_manifest(allow_partial=allow_partial)
        if max_views is not None and not 1 <= max_views <= self.m.num_views:
            raise ConfigError(f"max_views={max_views}: {self.url} holds {self.m.num_views} views per sample; "
                              f"choose 1..{self.m.num_views}")
        self.num_views = max_views or self.m.num_views
        if arrays is None:
            self.targets = target_arrays(self.m, logits=logits, taps=taps)
        else:
            unknown = sorted(set(arrays) - set(self.m.arrays))
            if unknown:
                raise CacheMismatchError(f"arrays {unknown} are not in this cache; it holds {sorted(self.m.arrays)}")
            self.targets = list(dict.fromkeys(arrays))
        self.taps = [c.tap.name for c in self.m.codecs() if isinstance(c, TokenCodec) and c.array in self.targets]
        views = [n for n in A.VIEW_RECORD_ARRAYS if n in self.m.arrays]
        self.read_names = list(dict.fromkeys([*views, A.LABEL, A.VALID, *self.targets]))
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)
        self.teacher_input, self.fresh_views = teacher_input, fresh_views
        units, valid = self._cached_units(store)
        self.plan = EpochPlan(units=units, valid=valid, num_tars=len(self.m.dataset.shards), num_views=self.num_views,
                              view_policy=view_policy, seed=int(seed), shuffle=shuffle,
                              shuffle_buffer=int(shuffle_buffer), drop_uneven=drop_uneven,
                              aug_repeats=int(aug_repeats))
        self._init_split(rank, world_size, threads, seed, view_policy)
        self._store: CacheStore | None = store
        self._store_pid = os.getpid()

    # --- which units hold which samples -------------------------------------------------

    def _cached_units(self, store: CacheStore) -> tuple[dict[int, tuple[int, ...]], dict[int, int]]:
        """Completed views per tar and valid (cached) samples per tar."""
        m = self.m
        T, V = len(m.dataset.shards), self.num_views
        if m.status == "complete":
            skipped: dict[int, set[str]] = {}
            for s in m.stats.skipped:
                skipped.setdefault(s.tar, set()).add(s.key)
            valid = {t: m.dataset.shards[t].count - len(skipped.get(t, ())) for t in range(T)}
            return {t: tuple(range(V)) for t in range(T)}, valid
        units: dict[int, list[int]] = {}
        valid = {}
        for done in store.read_unit_records():
            if done.view >= V or done.tar >= T:  # a unit of a growth still under way
                continue
            units.setdefault(done.tar, []).append(done.view)
            if valid.setdefault(done.tar, done.valid) != done.valid:
                raise CacheError(f"{self.url}: units of tar {done.tar} disagree on their cached sample count "
                                 f"({valid[done.tar]} vs {done.valid} in view {done.view}); the cache is damaged")
        log.info("%s: partial cache, %d of %d units complete", self.url, sum(map(len, units.values())), T * V)
        return {t: tuple(sorted(v)) for t, v in units.items()}, valid

    def store(self) -> CacheStore:
        """The read-only store, opened anew in each (forked or spawned) worker process."""
        if self._store is None or self._store_pid != os.getpid():
            self._store = CacheStore(self.url, self.storage_options, read_only=True)
            self._store_pid = os.getpid()
        return self._store

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_store"] = None  # zarr/fsspec handles do not cross processes
        return state

    def _load(self, task: Task) -> Loaded:
        return load_rows(self.store(), self.m, task, self.read_names, random_policy=self.view_policy == "random",
                         seed=self.seed, epoch=self.epoch)

    def _stream(self, task: Task, loaded: Loaded) -> Iterator[Sample]:
        samples = lockstep(self.m, task, loaded, storage_options=self.input_storage_options)
        recipe = self.m.config.views
        if recipe.mix is None:
            return samples
        # mixed views: each sample's record, and its partner, from the tar's stream (see with_partners)
        t, rows, records = task.tar, loaded.rows, loaded.records
        count = self.m.dataset.shards[t].count
        if self.fresh_views:  # a fresh mixed view: drawn as a cache of this recipe would, partners among cached samples
            fresh, valid = self._fresh_view(task.views[0]), rows[A.VALID].astype(bool).tolist()

            def record_of(s: Sample, view: int) -> ViewRecord:
                return sample_view(recipe, tar=t, position=s.position, view=fresh, width=s.image.width,
                                   height=s.image.height, count=count, valid=valid)
        else:
            def record_of(s: Sample, view: int) -> ViewRecord:
                return A.decode_view(records[view], s.position)
        return with_partners(samples, count=count, window=recipe.mix.window, record_of=record_of,
                             where=self.m.dataset.shards[t].url)

    def _replay(self, s: Sample) -> Sample:
        return replay(s, self.m.config.views, size=self.size, mean=self.mean, std=self.std,
                      teacher_input=self.teacher_input,
                      fresh_view=self._fresh_view(s.view) if self.fresh_views else None)

    def _fresh_view(self, view: int) -> int:
        """The never-cached view index a fresh view of cached view ``view`` draws: ``num_views + epoch`` (with
        ``aug_repeats`` R: ``num_views + epoch·R + r`` for the epoch's r-th repeat, so repeats differ)."""
        R = self.plan.aug_repeats
        if R == 1:  # any policy: one fresh view per sample and epoch
            return self.m.num_views + self.epoch
        return self.m.num_views + self.epoch * R + (view - self.epoch * R) % self.num_views  # policy cycle

    def _to_batch(self, raw: dict, device: str | torch.device) -> Batch:
        return to_batch(raw, self.m, taps=self.taps, device=device)


class TarDataset(EpochDataset):
    """:class:`~pipeline.tars.Sample`\\ s of plain WebDataset tars, no cache: epoch ``e`` replays view index
    ``e`` of ``recipe`` for every sample (a fresh, reproducible view each epoch); plan, split, order and
    resume as :class:`CacheDataset`. The tars are indexed once, at construction (sample counts for the
    plan); a bad sample stops the epoch naming its tar and key."""

    def __init__(self, urls: str | list[str], *, recipe: ViewRecipe, size: int | tuple[int, int],
                 mean: tuple[float, float, float], std: tuple[float, float, float], num_classes: int | None = None,
                 seed: int = 0, shuffle: bool = True, shuffle_buffer: int = 1024, rank: int | None = None,
                 world_size: int | None = None, drop_uneven: bool = False, storage_options: dict | None = None,
                 threads: int = 2) -> None:
        self.urls = expand_urls(urls, storage_options)
        self.url = self.urls[0] if len(self.urls) == 1 else f"{len(self.urls)} tars from {self.urls[0]}"
        self.storage_options = dict(storage_options or {})
        self.recipe, self.num_classes = recipe, num_classes
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)
        counts = [index_tar(u, self.storage_options).count for u in self.urls]
        self.plan = EpochPlan(units={t: (0,) for t in range(len(counts))}, valid=dict(enumerate(counts)),
                              num_tars=len(counts), num_views=1, seed=int(seed), shuffle=shuffle,
                              shuffle_buffer=int(shuffle_buffer), drop_uneven=drop_uneven)
        self._init_split(rank, world_size, threads, seed, "cycle")

    def _load(self, task: Task) -> None:
        return None

    def _stream(self, task: Task, loaded: None) -> Iterator[Sample]:
        for s in iter_samples(self.urls[task.tar], self.storage_options, num_classes=self.num_classes, tar=task.tar):
            yield dataclasses.replace(s, view=self.epoch)

    def _replay(self, s: Sample) -> Sample:
        return replay(s, self.recipe, size=self.size, mean=self.mean, std=self.std, fresh_view=self.epoch)

    def _to_batch(self, raw: dict, device: str | torch.device) -> Batch:
        return to_batch(raw, None, device=device)

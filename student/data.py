"""Student-side data: image tars and cache rows streamed in lockstep, views replayed at the student's size.

For each work unit (input tar, view) the image tar is streamed with ``pipeline.shards.iter_samples``
(checked against the cache's index keys, so a changed tar fails loudly) and the unit's cache rows
are read in one contiguous read per array (``CacheStore.read_unit``), for only the arrays needed:
the ``view_*`` records, ``label``/``valid`` and the requested targets. Rows with ``valid == 0``
(samples the caching job skipped) are skipped. Each sample's stored view is replayed with
``pipeline.views.apply_view`` — the one implementation the caching job used — at the student's
resolution, mean and std. Stages, each a generator over items:

    _load     per tar of the epoch, read ahead on a thread: index keys + cache rows (one read per unit)
    _lockstep tar samples zipped with their rows; skipped rows dropped; labels checked
    _reorder  the seeded shuffle buffer (an order planned up front, see below)
    _replay   views replayed on a thread pool (``prefetch_map``), so decode/augment overlaps training

Views per epoch (``view_policy``):
- ``"cycle"``: epoch ``e`` uses view ``e % V`` for every sample: one unit per tar per epoch.
- ``"random"``: each sample draws its view from a generator seeded by ``(seed, epoch, shard,
  position)``; the units of one tar are each read once and the drawn rows gathered.

Order and split. Every epoch, the tars are shuffled by a generator seeded by ``(seed, epoch)``
(the same on every rank and worker). The ``C = world_size * num_workers`` consumers (DDP rank
``r``, DataLoader worker ``w`` → consumer ``r * num_workers + w``) take the shuffled tars round
robin: consumer ``c`` streams tars ``c, c + C, …`` in turn, so together they see every cached
sample exactly once per epoch, none lost or repeated. A consumer's samples pass a shuffle buffer
(``shuffle_buffer`` items, seeded by ``(seed, epoch, C, c)``) that mixes samples of the units it
reads in turn. The buffer's output order depends only on how many samples each tar holds, which
the manifest (or the completion records) tells in advance, so the order is *planned* as a
permutation before any image is read (``shuffle_order``): that makes exact resume cheap (below).

Uneven counts. Consumers (and so ranks) get whole tars, so their sample counts differ when the
number of tars is not a multiple of ``C`` or tars differ in size. The trainer must then handle
uneven inputs (e.g. DDP's ``join()`` context), or set ``drop_uneven=True``: every consumer then
yields exactly the smallest consumer's count, the rest of its planned order dropped (the same
samples on every run). With the same ``num_workers`` and batch size on every rank, every rank
then runs the same number of steps. Use at most as many consumers as tars.

Exact resume. ``state_dict()`` is ``{epoch, seed, view_policy, num_consumers, consumed: {consumer:
samples}, next_worker: {rank: worker}}``. The main process counts what the trainer actually
consumed (``advance(batch)``; ``loader()`` does it for you), never what workers prefetched. On
resume (``load_state_dict``) each consumer skips its first ``consumed`` samples of the planned
order — tars wholly consumed are not read at all; in a partly consumed tar the skipped samples
are decoded but not replayed — and yields the rest in the same order. Because DataLoader takes
batches round robin from its workers starting at worker 0, worker ``i`` acts as worker ``(i +
next_worker) % num_workers`` on resume, so the batch sequence continues exactly where it
stopped. Resume needs the same seed, policy, world size and ``num_workers``. Under DDP each rank
counts its own consumers: gather every rank's ``state_dict()`` (``all_gather_object``) and save
``merge_states(...)``. ``set_epoch`` resets the counts; DataLoader must not use
``persistent_workers`` (workers copy the dataset, epoch and state, when an iteration starts).

Caches are opened read-only. A cache whose manifest is not complete is refused unless
``allow_partial=True``; then only the units with a completion record (read once, at construction)
are used: cycle skips a tar whose unit for the epoch's view is missing, random draws among a
tar's completed views.

Mixup and CutMix cannot be replayed from a cache. They blend two samples' pixels (and labels),
so the teacher's output on the mixed image is not a function of its cached outputs on the two
unmixed views: the logits are not linear in the input, and a feature map of a pasted box is not
the pasted box of the feature maps. Interpolating cached targets would distil from targets the
teacher never produced. As in TinyViT and ScaleKD, cached KD trains without them (the cached
views keep RandAugment and random erasing); :func:`refuse_mixup` says so when asked for them.
To train with Mixup/CutMix, run the teacher live on the mixed batch (``--online-teacher``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.shards import BadSampleError, BadShardError, expand_urls, iter_samples
from pipeline.store import CacheStore
from pipeline.unit import prefetch_map
from pipeline.views import apply_view, eval_view, sample_view
from storage_schemas import arrays as A
from storage_schemas.manifest import Manifest
from storage_schemas.views import ViewRecipe
from student.targets import TeacherTargets

log = logging.getLogger(__name__)

ViewPolicy = Literal["cycle", "random"]
VIEW_ARRAYS = (A.VIEW_CROP, A.VIEW_FLIP, A.VIEW_OPS, A.VIEW_OP_MAGS, A.VIEW_ERASE, A.VIEW_NOISE_SEED)
# Distinct first words keep the seed sequences of tar order and shuffle buffer apart from the
# per-sample view draws, which are seeded by (seed, epoch, shard, position) as documented.
_TAG_TARS = 0x7461727300
_TAG_BUFFER = 0x6275660000


# --- what to read ----------------------------------------------------------------------------


def target_arrays(m: Manifest, *, logits: bool = True, taps: Sequence[str] = ()) -> list[str]:
    """Cache arrays holding the requested targets: the logits arrays and each tap's (and its scale)."""
    names: list[str] = []
    if logits:
        if m.logits is None:
            raise ValueError("logits requested but this cache holds none (its targets.logits was off); "
                             "cache them, or train a method that does not need them")
        names += [A.LOGITS_FULL] if m.logits.mode == "full" else [
            A.LOGITS_TOPK_VALUES, A.LOGITS_TOPK_INDICES, A.LOGITS_LOGSUMEXP]
    by_name = {f.name: f for f in m.features}
    for tap in taps:
        if tap not in by_name:
            raise ValueError(f"tap {tap!r} is not in this cache; it holds {sorted(by_name) or 'no taps'}")
        names.append(A.feature_array(tap))
        if by_name[tap].dtype == "int8":
            names.append(A.feature_scale_array(tap))
    return names


def shuffle_order(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Output order ``[n]`` of a shuffle buffer of ``size`` items fed items ``0..n-1`` in turn.

    The classic streaming buffer: once full, each new item evicts a uniformly drawn one. Output
    ``k`` is always among inputs ``0..k + size - 1``, so a stream reordered by it holds at most
    ``size`` items. ``size <= 1`` keeps the input order.
    """
    if size <= 1 or n <= 1:
        return np.arange(n)
    u = rng.random(n)
    out = np.empty(n, np.int64)
    buf: list[int] = []
    k = 0
    for i in range(n):
        buf.append(i)
        if len(buf) == size:
            j = int(u[i] * size)
            buf[j], buf[-1] = buf[-1], buf[j]
            out[k] = buf.pop()
            k += 1
    out[k:] = rng.permutation(np.array(buf, np.int64))
    return out


def random_views(seed: int, epoch: int, shard: int, count: int, views: Sequence[int]) -> np.ndarray:
    """``[count]`` view per position for policy ``random``: one generator per ``(seed, epoch, shard, position)``."""
    views = np.asarray(views)
    out = np.empty(count, np.int64)
    for p in range(count):
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, shard, p])))
        out[p] = views[int(rng.integers(len(views)))]
    return out


@dataclass(frozen=True)
class _Task:
    """One tar's part of an epoch: ``n`` cached (valid) samples, views from ``views`` (completed ones)."""

    shard: int
    n: int
    views: tuple[int, ...]


@dataclass
class _Item:
    """One sample between lockstep and replay: decoded image, its rows and where it came from."""

    key: str
    shard: int
    position: int
    view: int
    label: int
    image: Any  # PIL image
    rows: dict[str, np.ndarray]  # the tar's rows [count, ...]; this sample is row ``position``


# --- the dataset -----------------------------------------------------------------------------


class CacheDataset(IterableDataset):
    """Per-sample dicts ``{"x": [3, H, W] float32, "label": int, "targets": {array: row}, "__key__",
    "shard", "position", "view", "consumer", "num_consumers"}`` of one epoch; see the module docstring."""

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
    ) -> None:
        """``arrays`` (target array names) overrides ``logits``/``taps``; ``storage_options`` are
        the cache's fsspec options, ``input_storage_options`` the image tars'.

        For the online teacher (``--online-teacher``): ``teacher_input=(size, mean, std)`` also
        replays each view at the teacher's input as ``"x_teacher"``; ``fresh_views`` replaces the
        stored record by a new one drawn for view index ``num_views + epoch`` (never cached,
        reproducible): the fresh-views upper bound that finitely many cached views approximate.
        ``max_views`` trains on the first N cached views only: view v of a sample is seeded by
        (seed, tar, position, v), so that is exactly what a cache of N views would hold."""
        if view_policy not in ("cycle", "random"):
            raise ValueError(f"view_policy must be 'cycle' or 'random', not {view_policy!r}")
        if isinstance(cache, CacheStore):
            cache, storage_options = cache.url, cache.storage_options
        self.url, self.storage_options = cache, dict(storage_options or {})
        self.input_storage_options = dict(input_storage_options or {})
        store = CacheStore(self.url, self.storage_options, read_only=True)
        self.m = store.read_manifest(allow_partial=allow_partial)
        self.recipe = ViewRecipe.model_validate(self.m.config["views"])
        if max_views is not None and not 1 <= max_views <= self.m.num_views:
            raise ValueError(f"max_views={max_views}: {self.url} holds {self.m.num_views} views per sample; "
                             f"choose 1..{self.m.num_views}")
        self.num_views = max_views or self.m.num_views
        self.on_bad_sample = self.m.config.get("input", {}).get("on_bad_sample", "error")
        if arrays is None:
            self.targets = target_arrays(self.m, logits=logits, taps=taps)
        else:
            unknown = sorted(set(arrays) - set(self.m.arrays))
            if unknown:
                raise ValueError(f"arrays {unknown} are not in this cache; it holds {sorted(self.m.arrays)}")
            self.targets = list(dict.fromkeys(arrays))
        self.taps = [f.name for f in self.m.features if A.feature_array(f.name) in self.targets]
        views = [n for n in VIEW_ARRAYS if n in self.m.arrays]
        self.read_names = list(dict.fromkeys([*views, A.LABEL, A.VALID, *self.targets]))
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)
        self.teacher_input, self.fresh_views = teacher_input, fresh_views
        self.view_policy, self.seed, self.shuffle = view_policy, int(seed), shuffle
        self.shuffle_buffer, self.drop_uneven, self.threads = int(shuffle_buffer), drop_uneven, max(1, threads)
        if rank is None or world_size is None:
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = rank if rank is not None else (torch.distributed.get_rank() if dist else 0)
            world_size = world_size if world_size is not None else (torch.distributed.get_world_size() if dist else 1)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.rank, self.world_size = rank, world_size
        self._units, self._valid = self._cached_units(store)
        self.epoch = 0
        self._consumed: dict[int, int] = {}
        self._next_worker: dict[int, int] = {}
        self._state_consumers: int | None = None
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
                skipped.setdefault(s.shard, set()).add(s.key)
            valid = {t: m.dataset.shards[t].count - len(skipped.get(t, ())) for t in range(T)}
            return {t: tuple(range(V)) for t in range(T)}, valid
        units: dict[int, list[int]] = {}
        valid = {}
        for rec in store.read_unit_records():
            if rec.view >= V or rec.shard >= T:  # a unit of a growth still under way
                continue
            units.setdefault(rec.shard, []).append(rec.view)
            if valid.setdefault(rec.shard, rec.valid) != rec.valid:
                raise ValueError(f"{self.url}: units of shard {rec.shard} disagree on their cached sample count "
                                 f"({valid[rec.shard]} vs {rec.valid} in view {rec.view}); the cache is damaged")
        log.info("%s: partial cache, %d of %d units complete", self.url, sum(map(len, units.values())), T * V)
        return {t: tuple(sorted(v)) for t, v in units.items()}, valid

    def store(self) -> CacheStore:
        """The read-only store, opened anew in each (forked or spawned) worker process."""
        if self._store is None or self._store_pid != os.getpid():
            self._store = CacheStore(self.url, self.storage_options, read_only=True)
            self._store_pid = os.getpid()
        return self._store

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_store"] = None  # zarr/fsspec handles do not cross processes
        return state

    def plan(self, epoch: int) -> list[_Task]:
        """The tars of ``epoch`` in the order consumers take them round robin (same on every consumer)."""
        V = self.num_views
        tasks = []
        for t in range(len(self.m.dataset.shards)):
            done = self._units.get(t, ())
            views = (epoch % V,) if self.view_policy == "cycle" else done
            if views and set(views) <= set(done):
                tasks.append(_Task(shard=t, n=self._valid[t], views=tuple(views)))
        if self.shuffle:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([_TAG_TARS, self.seed, epoch])))
            tasks = [tasks[i] for i in rng.permutation(len(tasks))]
        return tasks

    def consumer_order(self, epoch: int, consumer: int, num_consumers: int) -> tuple[list[_Task], np.ndarray]:
        """Consumer ``consumer``'s tars and its planned output order ``[n]`` (indices into the
        concatenated valid samples of those tars), truncated under ``drop_uneven``."""
        plan = self.plan(epoch)
        mine = plan[consumer::num_consumers]
        seq = [self.seed, epoch, num_consumers, consumer]
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([_TAG_BUFFER, *seq])))
        order = shuffle_order(sum(t.n for t in mine), self.shuffle_buffer, rng)
        if self.drop_uneven:
            quota = min(sum(t.n for t in plan[c::num_consumers]) for c in range(num_consumers))
            order = order[:quota]
        return mine, order

    def num_samples(self, num_workers: int = 0) -> int:
        """Samples this rank yields in the current epoch (all its workers), resume skips included."""
        N = max(1, num_workers)
        C = self.world_size * N
        return sum(len(self.consumer_order(self.epoch, self.rank * N + w, C)[1]) for w in range(N))

    # --- epoch and resume state ---------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Select epoch ``epoch`` (its views and order) and forget consumed counts."""
        self.epoch = int(epoch)
        self._consumed, self._next_worker, self._state_consumers = {}, {}, None

    def advance(self, batch: Batch | dict | list[dict]) -> None:
        """Count a batch as consumed by the trainer (for :meth:`state_dict`); main process only."""
        if isinstance(batch, Batch):
            consumers, C = batch.consumers, batch.num_consumers
        elif isinstance(batch, dict):
            consumers, C = batch["consumer"], batch["num_consumers"]
        else:
            consumers, C = [s["consumer"] for s in batch], batch[0]["num_consumers"] if batch else None
        consumers = [int(c) for c in consumers]
        if not consumers:
            return
        if C is None:
            raise ValueError("batch carries no consumer information: build it from CacheDataset's samples")
        C = int(C)
        if self._state_consumers not in (None, C):
            raise ValueError(f"batch from {C} consumers, but this epoch's state counts {self._state_consumers}")
        self._state_consumers = C
        N = C // self.world_size
        for c in consumers:
            self._consumed[c] = self._consumed.get(c, 0) + 1
        self._next_worker[self.rank] = (consumers[-1] - self.rank * N + 1) % N

    def state_dict(self) -> dict:
        """Position in the epoch: plain JSON-able values (see the module docstring)."""
        return {"epoch": self.epoch, "seed": self.seed, "view_policy": self.view_policy,
                "num_consumers": self._state_consumers,
                "consumed": {str(c): n for c, n in sorted(self._consumed.items())},
                "next_worker": {str(r): w for r, w in sorted(self._next_worker.items())}}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state`` (this rank's entries are used; see :func:`merge_states`)."""
        for k in ("seed", "view_policy"):
            if state[k] != getattr(self, k):
                raise ValueError(f"resume state was taken with {k}={state[k]!r}, this dataset has "
                                 f"{getattr(self, k)!r}; the remaining samples would differ")
        self.epoch = int(state["epoch"])
        self._consumed = {int(c): int(n) for c, n in state["consumed"].items()}
        self._next_worker = {int(r): int(w) for r, w in state["next_worker"].items()}
        self._state_consumers = state["num_consumers"]

    # --- iteration ----------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        N, i = (info.num_workers, info.id) if info is not None else (1, 0)
        C = self.world_size * N
        if self._state_consumers not in (None, C):
            raise ValueError(
                f"resume state was taken with {self._state_consumers} consumers (world_size x num_workers), "
                f"this run has {C} ({self.world_size} x {N}); resume with the same world size and workers")
        w = (i + self._next_worker.get(self.rank, 0)) % N  # see "Exact resume" in the module docstring
        c = self.rank * N + w
        tasks, order = self.consumer_order(self.epoch, c, C)
        if c == 0 and C > len(self.plan(self.epoch)):
            log.warning("%d consumers (world_size %d x workers %d) but %d tars this epoch: some stay idle",
                        C, self.world_size, N, len(self.plan(self.epoch)))
        skip = self._consumed.get(c, 0)
        order = order[skip:]
        replayed = prefetch_map(self._replay, self._reorder(tasks, order), workers=self.threads,
                                lookahead=4 * self.threads)
        for sample in replayed:
            sample["consumer"], sample["num_consumers"] = c, C
            yield sample

    def _reorder(self, tasks: list[_Task], order: np.ndarray) -> Iterator[_Item]:
        """The lockstep stream reordered by ``order``; items not in it are dropped unreplayed,
        tars with none of it are not read."""
        if len(order) == 0:
            return
        total = sum(t.n for t in tasks)
        wanted = np.zeros(total, bool)
        wanted[order] = True
        starts = np.cumsum([0] + [t.n for t in tasks])
        todo = [(t, int(s)) for t, s in zip(tasks, starts[:-1], strict=True) if wanted[s:s + t.n].any()]
        pending: dict[int, _Item] = {}
        k = 0
        loaded = prefetch_map(self._load, todo, workers=1, lookahead=2)
        for (task, start), (keys, rows, views) in zip(todo, loaded, strict=True):
            for j, item in enumerate(self._lockstep(task, keys, rows, views)):
                if wanted[start + j]:
                    pending[start + j] = item
                while k < len(order) and order[k] in pending:
                    yield pending.pop(int(order[k]))
                    k += 1
        if k != len(order):  # cannot happen unless the counts lied; fail rather than lose samples
            raise RuntimeError(f"{self.url}: planned {len(order)} samples, streamed {k}")

    def _load(self, job: tuple[_Task, int]) -> tuple[list[str], dict[str, np.ndarray], np.ndarray]:
        """Index keys, rows ``[count, ...]`` and view per position of one tar; each unit read once."""
        task = job[0]
        store, m, t = self.store(), self.m, task.shard
        count = m.dataset.shards[t].count
        keys = store.read_index(t)
        if self.view_policy == "cycle" or len(task.views) == 1:
            v = task.views[0]
            return keys, store.read_unit(m, t, v, self.read_names), np.full(count, v)
        views = random_views(self.seed, self.epoch, t, count, task.views)
        rows: dict[str, np.ndarray] = {}
        for v in np.unique(views):
            unit = store.read_unit(m, t, int(v), self.read_names)
            sel = views == v
            for name, arr in unit.items():
                if name not in rows:
                    rows[name] = np.empty_like(arr)
                rows[name][sel] = arr[sel]
        return keys, rows, views

    def _lockstep(self, task: _Task, keys: list[str], rows: dict[str, np.ndarray],
                  views: np.ndarray) -> Iterator[_Item]:
        """The tar's samples zipped with their rows, in tar order; rows not cached are skipped."""
        url = self.m.dataset.shards[task.shard].url
        valid, labels = rows[A.VALID], rows[A.LABEL]
        n = 0
        for s in iter_samples(url, self.input_storage_options, on_bad_sample=self.on_bad_sample,
                              num_classes=self.m.teacher.num_classes, keys=keys):
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
            yield _Item(key=s.key, shard=task.shard, position=p, view=int(views[p]), label=int(s.label),
                        image=s.image, rows=rows)
        if n != task.n:
            raise BadShardError(url, f"{n} cached samples streamed, the cache records {task.n}")

    def _replay(self, item: _Item) -> dict:
        if self.fresh_views:
            view = self.m.num_views + self.epoch
            record = sample_view(self.recipe, shard=item.shard, position=item.position, view=view,
                                 width=item.image.width, height=item.image.height)
        else:
            record = A.decode_view(item.rows, item.position)
        x = apply_view(item.image, record, self.recipe, size=self.size, mean=self.mean, std=self.std)
        out = {"x": x, "label": item.label, "targets": {n: item.rows[n][item.position] for n in self.targets},
               "__key__": item.key, "shard": item.shard, "position": item.position, "view": item.view}
        if self.teacher_input is not None:
            size, mean, std = self.teacher_input
            out["x_teacher"] = apply_view(item.image, record, self.recipe, size=size, mean=mean, std=std)
        return out

    # --- batches ------------------------------------------------------------------------

    def collate(self, samples: list[dict] | dict, device: str | torch.device = "cpu") -> Batch:
        """:func:`collate` with this cache's manifest and taps."""
        return collate(samples, self.m, taps=self.taps, device=device)

    def loader(self, batch_size: int, *, num_workers: int = 0, device: str | torch.device = "cpu",
               pin_memory: bool = False, drop_last: bool = False) -> Iterator[Batch]:
        """Batches of the current epoch through a DataLoader; targets decoded here, in the main
        process; each batch counted as consumed when it is handed out."""
        dl = DataLoader(self, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_rows,
                        pin_memory=pin_memory, drop_last=drop_last, persistent_workers=False)
        for raw in dl:
            batch = self.collate(raw, device=device)
            self.advance(batch)
            yield batch


def merge_states(states: Iterable[dict]) -> dict:
    """One resume state from every rank's :meth:`CacheDataset.state_dict` (consumers are disjoint)."""
    states = list(states)
    out = {**states[0], "consumed": {}, "next_worker": {}}
    for s in states:
        if (s["epoch"], s["seed"], s["view_policy"]) != (out["epoch"], out["seed"], out["view_policy"]):
            raise ValueError("resume states of different epochs, seeds or policies cannot be merged")
        out["num_consumers"] = out["num_consumers"] or s["num_consumers"]
        out["consumed"].update(s["consumed"])
        out["next_worker"].update(s["next_worker"])
    return out


# --- collation -------------------------------------------------------------------------------


class Batch(NamedTuple):
    """A decoded batch: ``x`` [B, 3, H, W], ``labels`` [B] int64, ``targets`` from the cache rows,
    then where each sample came from (for checks and resume)."""

    x: torch.Tensor
    labels: torch.Tensor
    targets: TeacherTargets
    keys: list[str]
    shards: torch.Tensor
    positions: torch.Tensor
    views: torch.Tensor
    consumers: list[int]
    num_consumers: int | None
    x_teacher: torch.Tensor | None = None  # the same views at the teacher's input (online teacher)


def collate_rows(samples: list[dict]) -> dict:
    """DataLoader ``collate_fn``: stacks samples into tensors without decoding targets (cheap in a
    worker; tensors cross to the main process through shared memory)."""
    return {
        "x": torch.stack([s["x"] for s in samples]),
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
        "targets": {n: torch.from_numpy(np.stack([s["targets"][n] for s in samples]))
                    for n in (samples[0]["targets"] if samples else ())},
        "__key__": [s["__key__"] for s in samples],
        "shard": torch.tensor([s["shard"] for s in samples]),
        "position": torch.tensor([s["position"] for s in samples]),
        "view": torch.tensor([s["view"] for s in samples]),
        "consumer": [s.get("consumer", 0) for s in samples],
        "num_consumers": samples[0].get("num_consumers") if samples else None,
        "x_teacher": torch.stack([s["x_teacher"] for s in samples]) if samples and "x_teacher" in samples[0]
        else None,
    }


def collate(samples: list[dict] | dict, m: Manifest, *, taps: Sequence[str] | None = None,
            device: str | torch.device = "cpu") -> Batch:
    """Samples (or :func:`collate_rows`' output) → :class:`Batch`, targets decoded with
    ``TeacherTargets.from_arrays`` on ``device``; only the logits/taps present in the rows."""
    raw = samples if isinstance(samples, dict) else collate_rows(samples)
    arrays = {n: t.numpy() if isinstance(t, torch.Tensor) else t for n, t in raw["targets"].items()}
    return Batch(
        x=raw["x"].to(device), labels=raw["label"].to(device),
        targets=TeacherTargets.from_arrays(arrays, m, device=device, taps=taps),
        keys=raw["__key__"], shards=raw["shard"], positions=raw["position"], views=raw["view"],
        consumers=list(raw["consumer"]), num_consumers=raw["num_consumers"],
        x_teacher=None if raw.get("x_teacher") is None else raw["x_teacher"].to(device),
    )


# --- evaluation ------------------------------------------------------------------------------


class EvalDataset(IterableDataset):
    """``(x [3, H, W], label)`` of validation tars with timm's centre-crop eval transform
    (``pipeline.views.eval_view``); no cache. Tars are split round robin over ranks and workers."""

    def __init__(self, urls: str | list[str], *, size: int | tuple[int, int], mean: tuple[float, float, float],
                 std: tuple[float, float, float], crop_pct: float = 0.875, interpolation: str = "bicubic",
                 storage_options: dict | None = None, num_classes: int | None = None,
                 rank: int | None = None, world_size: int | None = None, threads: int = 2) -> None:
        self.urls = expand_urls(urls, storage_options)  # fails fast in the main process
        self.storage_options = dict(storage_options or {})
        self.size, self.mean, self.std, self.crop_pct, self.interpolation = size, mean, std, crop_pct, interpolation
        self.num_classes, self.threads = num_classes, max(1, threads)
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = rank if rank is not None else (torch.distributed.get_rank() if dist else 0)
        self.world_size = world_size if world_size is not None else (torch.distributed.get_world_size() if dist else 1)

    def _samples(self, urls: list[str]) -> Iterator[Any]:
        for url in urls:
            yield from iter_samples(url, self.storage_options, num_classes=self.num_classes)

    def _view(self, s: Any) -> tuple[torch.Tensor, int]:
        x = eval_view(s.image, size=self.size, mean=self.mean, std=self.std, crop_pct=self.crop_pct,
                      interpolation=self.interpolation)
        return x, s.label

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        info = get_worker_info()
        N, w = (info.num_workers, info.id) if info is not None else (1, 0)
        mine = self.urls[self.rank * N + w::self.world_size * N]
        yield from prefetch_map(self._view, self._samples(mine), workers=self.threads, lookahead=4 * self.threads)


def eval_loader(urls: str | list[str], size: int | tuple[int, int], mean: tuple[float, float, float],
                std: tuple[float, float, float], batch_size: int, crop_pct: float = 0.875, *,
                interpolation: str = "bicubic", num_workers: int = 0, storage_options: dict | None = None,
                num_classes: int | None = None, rank: int | None = None,
                world_size: int | None = None) -> DataLoader:
    """Batches ``(x [B, 3, H, W], labels [B])`` over validation tars; under DDP each rank sees
    its share of the tars (sum the counts over ranks)."""
    ds = EvalDataset(urls, size=size, mean=mean, std=std, crop_pct=crop_pct, interpolation=interpolation,
                     storage_options=storage_options, num_classes=num_classes, rank=rank, world_size=world_size)
    return DataLoader(ds, batch_size=batch_size, num_workers=num_workers)


def refuse_mixup(mixup: float, cutmix: float) -> None:
    """Raise ValueError when Mixup or CutMix is asked for: a cache cannot replay them."""
    if mixup > 0 or cutmix > 0:
        raise ValueError(
            f"mixup={mixup}, cutmix={cutmix}: Mixup/CutMix cannot be used with cached teacher targets. They blend "
            "two images, and the teacher's logits and features on a blended image are not a blend of its cached "
            "outputs on the two unmixed views, so the cache holds no target for the mixed input. Set mixup=0 and "
            "cutmix=0 (the cached views already carry RandAugment and random erasing, as in TinyViT/ScaleKD), "
            "or train with --online-teacher to run the teacher on the mixed batch."
        )

"""The student's epoch plan: which tars and views an epoch reads, who reads what, in which order,
and where a resumed run starts — pure functions of counts and seeds, no I/O.

Views per epoch (``view_policy``):
- ``"cycle"``: epoch ``e`` uses view ``e % V`` for every sample: one unit per tar per epoch.
- ``"random"``: each sample draws its view from a generator seeded by ``(seed, epoch, tar,
  position)``; the units of one tar are each read once and the drawn rows gathered.

Repeated augmentation (``aug_repeats = R``, DeiT's RASampler / VanillaKD's ``--aug-repeats 3``; policy
``cycle`` only): epoch ``e`` reads ``R`` units of each tar, views ``(e·R + r) % V`` for ``r < R``, so every
cached sample is seen exactly ``R`` times per epoch, each time through a different cached view (``R <= V``
is required), and over epochs the views are taken in turn as with ``R = 1``. The ``R`` units are tasks like
any other: shuffled with the tars and dealt round robin, so a sample's repeats usually go to different
consumers (ranks), as RASampler sends them to different GPUs. Unlike RASampler and timm's
``RepeatAugSampler``, which keep an epoch at the dataset's length (about ``1/R`` of the samples per epoch,
each ``R`` times), an epoch here holds every sample ``R`` times, ``R`` times the steps: to match their
sample budget, train ``epochs / R`` epochs.

Order and split. Every epoch, the tars are shuffled by a generator seeded by ``(seed, epoch)``
(the same on every rank and worker). The ``C = world_size * num_workers`` consumers (DDP rank
``r``, DataLoader worker ``w`` → consumer ``r * num_workers + w``) take the shuffled tars round
robin: consumer ``c`` streams tars ``c, c + C, …`` in turn, so together they see every cached
sample exactly once per epoch, none lost or repeated. A consumer's samples pass a shuffle buffer
(``shuffle_buffer`` items, seeded by ``(seed, epoch, C, c)``) that mixes samples of the units it
reads in turn. The buffer's output order depends only on how many samples each tar holds, which
the manifest (or the completion records) tells in advance, so the order is *planned* as a
permutation before any image is read (:func:`shuffle_order`): that makes exact resume cheap.

Uneven counts. Consumers (and so ranks) get whole tars, so their sample counts differ when the
number of tars is not a multiple of ``C`` or tars differ in size. The trainer must then handle
uneven inputs (e.g. DDP's ``join()`` context), or set ``drop_uneven=True``: every consumer then
yields exactly the smallest consumer's count, the rest of its planned order dropped (the same
samples on every run).

Exact resume (:class:`EpochProgress`). The main process counts what the trainer actually consumed,
per consumer, never what workers prefetched. On resume each consumer skips its first ``consumed``
samples of the planned order and yields the rest in the same order. Because DataLoader takes
batches round robin from its workers starting at worker 0, worker ``i`` acts as worker ``(i +
next_worker) % num_workers`` on resume, so the batch sequence continues exactly where it stopped.
Resume needs the same seed, policy, world size and ``num_workers``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from storage_schemas.errors import ConfigError

ViewPolicy = Literal["cycle", "random"]
# Distinct first words keep the seed sequences of tar order and shuffle buffer apart from the
# per-sample view draws, which are seeded by (seed, epoch, tar, position) as documented.
_TAG_TARS = 0x7461727300
_TAG_BUFFER = 0x6275660000


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


def random_views(seed: int, epoch: int, tar: int, count: int, views: Sequence[int]) -> np.ndarray:
    """``[count]`` view per position for policy ``random``: one generator per ``(seed, epoch, tar, position)``."""
    views = np.asarray(views)
    out = np.empty(count, np.int64)
    for p in range(count):
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, tar, p])))
        out[p] = views[int(rng.integers(len(views)))]
    return out


@dataclass(frozen=True)
class Task:
    """One tar's part of an epoch: ``n`` cached (valid) samples, views from ``views`` (completed ones)."""

    tar: int
    n: int
    views: tuple[int, ...]


@dataclass(frozen=True)
class EpochPlan:
    """What the cache offers (completed views and valid samples per tar, ``num_views`` used) and how an
    epoch is drawn from it."""

    units: Mapping[int, tuple[int, ...]]  # tar -> its completed views
    valid: Mapping[int, int]  # tar -> its cached (valid) samples
    num_tars: int
    num_views: int
    view_policy: ViewPolicy = "cycle"
    seed: int = 0
    shuffle: bool = True
    shuffle_buffer: int = 1024
    drop_uneven: bool = False
    aug_repeats: int = 1

    def __post_init__(self) -> None:
        R = self.aug_repeats
        if R < 1:
            raise ConfigError(f"data.aug_repeats={R}: must be >= 1")
        if R > 1 and self.view_policy != "cycle":
            raise ConfigError(f"data.aug_repeats={R} needs data.view_policy: cycle (each repeat a different cached "
                              f"view, in turn); view_policy {self.view_policy!r} draws one view per sample")
        if R > self.num_views:
            raise ConfigError(f"data.aug_repeats={R}: the cache serves {self.num_views} views per sample "
                              "(data.max_views or the cache's views.num_views), so a sample can be seen at most "
                              f"{self.num_views} times per epoch through different views")

    def tasks(self, epoch: int) -> list[Task]:
        """The (tar, views) units of ``epoch`` in the order consumers take them round robin (same on every
        consumer): one per tar, or ``aug_repeats`` per tar (module docstring)."""
        tasks = []
        for t in range(self.num_tars):
            done = self.units.get(t, ())
            if self.view_policy == "cycle":
                choices = [((epoch * self.aug_repeats + r) % self.num_views,) for r in range(self.aug_repeats)]
            else:
                choices = [done]
            for views in choices:
                if views and set(views) <= set(done):
                    tasks.append(Task(tar=t, n=self.valid[t], views=tuple(views)))
        if self.shuffle:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([_TAG_TARS, self.seed, epoch])))
            tasks = [tasks[i] for i in rng.permutation(len(tasks))]
        return tasks

    def consumer_order(self, epoch: int, consumer: int, num_consumers: int) -> tuple[list[Task], np.ndarray]:
        """Consumer ``consumer``'s tars and its planned output order ``[n]`` (indices into the
        concatenated valid samples of those tars), truncated under ``drop_uneven``."""
        plan = self.tasks(epoch)
        mine = plan[consumer::num_consumers]
        seq = [self.seed, epoch, num_consumers, consumer]
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([_TAG_BUFFER, *seq])))
        order = shuffle_order(sum(t.n for t in mine), self.shuffle_buffer, rng)
        if self.drop_uneven:
            quota = min(sum(t.n for t in plan[c::num_consumers]) for c in range(num_consumers))
            order = order[:quota]
        return mine, order

    def num_samples(self, epoch: int, rank: int, world_size: int, num_workers: int = 0) -> int:
        """Samples rank ``rank`` yields in ``epoch`` (all its workers), resume skips included."""
        N = max(1, num_workers)
        C = world_size * N
        return sum(len(self.consumer_order(epoch, rank * N + w, C)[1]) for w in range(N))


@dataclass
class EpochProgress:
    """Position in an epoch: samples consumed per consumer, and which worker serves next on each rank."""

    epoch: int = 0
    seed: int = 0
    view_policy: ViewPolicy = "cycle"
    num_consumers: int | None = None
    consumed: dict[int, int] = field(default_factory=dict)
    aug_repeats: int = 1
    next_worker: dict[int, int] = field(default_factory=dict)

    def advance(self, consumers: Sequence[int], num_consumers: int | None, rank: int, world_size: int) -> None:
        """Count samples of the given consumers as consumed by the trainer (main process only)."""
        consumers = [int(c) for c in consumers]
        if not consumers:
            return
        if num_consumers is None:
            raise ValueError("batch carries no consumer information: build it from CacheDataset's samples")
        C = int(num_consumers)
        if self.num_consumers not in (None, C):
            raise ValueError(f"batch from {C} consumers, but this epoch's state counts {self.num_consumers}")
        self.num_consumers = C
        N = C // world_size
        for c in consumers:
            self.consumed[c] = self.consumed.get(c, 0) + 1
        self.next_worker[rank] = (consumers[-1] - rank * N + 1) % N

    def state_dict(self) -> dict:
        """Plain JSON-able values: ``{epoch, seed, view_policy, aug_repeats, num_consumers, consumed, next_worker}``."""
        return {"epoch": self.epoch, "seed": self.seed, "view_policy": self.view_policy,
                "aug_repeats": self.aug_repeats,
                "num_consumers": self.num_consumers,
                "consumed": {str(c): n for c, n in sorted(self.consumed.items())},
                "next_worker": {str(r): w for r, w in sorted(self.next_worker.items())}}

    @classmethod
    def from_state(cls, state: dict, *, seed: int, view_policy: str, aug_repeats: int = 1) -> EpochProgress:
        """The progress saved as ``state``; refused when taken with another seed, view policy or aug_repeats
        (states saved before aug_repeats existed had 1)."""
        for k, was, have in (("seed", state["seed"], seed), ("view_policy", state["view_policy"], view_policy),
                             ("aug_repeats", state.get("aug_repeats", 1), aug_repeats)):
            if was != have:
                raise ConfigError(f"resume state was taken with {k}={was!r}, this run has {have!r}; the "
                                  "remaining samples would differ")
        return cls(epoch=int(state["epoch"]), seed=seed, view_policy=view_policy, aug_repeats=aug_repeats,
                   num_consumers=state["num_consumers"],
                   consumed={int(c): int(n) for c, n in state["consumed"].items()},
                   next_worker={int(r): int(w) for r, w in state["next_worker"].items()})


def merge_states(states: Iterable[dict]) -> dict:
    """One resume state from every rank's ``state_dict()`` (their consumers are disjoint)."""
    states = list(states)
    out = {**states[0], "consumed": {}, "next_worker": {}}
    for s in states:
        key = ("epoch", "seed", "view_policy")
        if [s[k] for k in key] + [s.get("aug_repeats", 1)] != [out[k] for k in key] + [out.get("aug_repeats", 1)]:
            raise ValueError("resume states of different epochs, seeds, policies or aug_repeats cannot be merged")
        out["num_consumers"] = out["num_consumers"] or s["num_consumers"]
        out["consumed"].update(s["consumed"])
        out["next_worker"].update(s["next_worker"])
    return out

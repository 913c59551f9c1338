"""The student trainer: a timm student distilled from a cache, single process or DDP (torchrun).

The step is the nanoGPT kind you read in one sitting: replayed views and decoded cache
targets come from :class:`student.data.CacheDataset`; the :class:`Distiller` runs the
student once through timm's ``forward_intermediates`` and sums the named, weighted losses
of the configured methods (timm's task contract: a dict with ``loss`` and each component).
Checkpoints hold tensors and plain values only and load with ``weights_only=True``.
Without a cache (``data.train_urls``) the same loop trains supervised on fresh views of plain
tars (:class:`student.data.TarDataset`): the demo's teacher, or a no-KD baseline.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.distributed as dist
import yaml
from fsspec.implementations.local import LocalFileSystem
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from tqdm.auto import tqdm

from pipeline.catalog import find_cache
from pipeline.crash_points import crash_point
from pipeline.store import CacheStore, atomic_write
from pipeline.targets import encode_targets
from pipeline.teacher import Teacher, resolve_input
from pipeline.tpp import load_input_stats, load_pack
from storage_schemas.errors import CacheMismatchError, ConfigError
from storage_schemas.manifest import Manifest
from storage_schemas.views import ViewRecipe

from .batch_mix import BatchMix
from .config import TrainConfig, check_mix
from .data import CacheDataset, TarDataset, merge_states
from .evaluate import eval_loader, evaluate
from .methods import (
    Needs,
    TeacherContext,
    build_methods,
    check_cache,
    needs_of,
    student_forward,
    student_info,
)
from .targets import TeacherTargets


class Distiller(torch.nn.Module):
    """Student + KD methods (with their projectors) as one module, so DDP wraps one forward."""

    def __init__(self, student: torch.nn.Module, methods: torch.nn.ModuleList) -> None:
        super().__init__()
        self.student, self.methods = student, methods
        self.student_indices = tuple(dict.fromkeys(i for m in methods for i in m.student_indices()))

    def no_weight_decay(self) -> set[str]:
        """The student's own exclusions from weight decay (a timm ViT's ``pos_embed``, ``cls_token``…) under this
        wrapper's names: ``create_optimizer_v2`` asks the module it is given, and the DeiT / ViTKD recipes do not
        decay them (timm also skips every 1-D parameter: biases and norms)."""
        own = getattr(self.student, "no_weight_decay", None)
        return {f"student.{name}" for name in own()} if own is not None else set()

    def forward(self, x: torch.Tensor, targets: TeacherTargets, labels: torch.Tensor, step: int) -> dict:
        out = student_forward(self.student, x, self.student_indices)
        losses: dict[str, torch.Tensor] = {}
        for m in self.methods:
            m.set_step(step)
            losses.update(m(out, targets, labels))
        return {"loss": sum(losses.values()), "output": out.logits, **losses}


def _distributed() -> tuple[int, int]:
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build_student(cfg: TrainConfig) -> tuple[torch.nn.Module, int, tuple, tuple]:
    """The timm student and its input size, mean and std (config, else the model's pretrained config)."""
    st = cfg.student
    student = timm.create_model(st.model, **st.model_kwargs)
    return (student, *resolve_input(student, st.model_kwargs, st.input_size, st.mean, st.std))


def open_cache(cfg: TrainConfig, needs: Needs | None = None) -> tuple[str, CacheStore, Manifest]:
    """``cfg``'s cache: its URL, read-only store and manifest, checked once against what the methods need (every
    missing target named) before anything is built. The Ray driver calls it too, so that a config error stops the
    run before any worker starts (a worker's error would restart the group ``ray.max_failures`` times)."""
    c = cfg.cache
    url = c.url or find_cache(c.root, c.id, c.storage_options).url
    store = CacheStore(url, c.storage_options, read_only=True)
    m = store.read_manifest(allow_partial=c.allow_partial)
    # the cache's mixes are replayed as built: data.mixup/cutmix may only restate them
    check_mix(url, m.config.views.mix, cfg.data.mixup, cfg.data.cutmix, online=cfg.online_teacher is not None)
    check_cache(needs or needs_of(cfg.methods, cfg.method_options), m)
    return url, store, m


class Trainer:
    """Builds everything from a :class:`TrainConfig`; :meth:`fit` trains, resuming from ``output/last.pt``."""

    def __init__(self, cfg: TrainConfig, *, progress: bool = True, device: torch.device | None = None,
                 on_checkpoint: Callable[[Trainer, bool], None] | None = None) -> None:
        """``device``: where this rank trains (default: cuda:LOCAL_RANK when CUDA is there, as under torchrun);
        ``on_checkpoint(trainer, final)``: called on every rank after each checkpoint and, with ``final``, after
        ``final.json`` (Ray Train reports its checkpoints through it)."""
        self.cfg, self.progress, self.on_checkpoint = cfg, progress, on_checkpoint
        self.rank, self.world = _distributed()
        if device is not None:
            self.device = device
        elif cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        else:
            self.device = torch.device("cpu")
        torch.manual_seed(cfg.seed)
        needs = needs_of(cfg.methods, cfg.method_options)
        self.manifest = m = self._open_cache(needs) if cfg.cache else None
        student, self.size, self.mean, self.std = build_student(cfg)
        self.num_classes = m.teacher.num_classes if m else int(student.num_classes)
        info = student_info(student, self.size)
        methods = build_methods(cfg.methods, cfg.method_options, info, self._teacher_context(m))
        self.model = Distiller(student, methods).to(self.device)
        self.taps = [m.tap_serving(spec).name for spec in needs.taps] if m else []
        self.teacher = (Teacher.from_manifest(m, cfg.online_teacher.checkpoint, cfg.online_teacher.storage_options,
                                              device=self.device) if cfg.online_teacher else None)
        self.dataset = self._cache_dataset(needs.logits) if m else self._tar_dataset()
        self.batch_mix = None  # timm's batch Mixup/CutMix, with the teacher in the loop on an unmixed cache
        if m is not None and check_mix(self.cache_url, m.config.views.mix, cfg.data.mixup, cfg.data.cutmix,
                                       online=self.teacher is not None):
            BatchMix.check_sizes(self.size, self.teacher.input_size)
            self.batch_mix = BatchMix(cfg.data.mixup or 0.0, cfg.data.cutmix or 0.0, self.num_classes, cfg.seed,
                                      self.rank)
        o = cfg.optim
        self.optimizer = create_optimizer_v2(self.model, opt=o.opt, lr=o.lr, weight_decay=o.weight_decay,
                                             momentum=o.momentum)
        per_rank = self.dataset.num_samples(cfg.data.num_workers)
        self.steps_per_epoch = max(1, math.ceil(per_rank / cfg.data.batch_size))
        self.scheduler, _ = create_scheduler_v2(self.optimizer, sched=o.sched, num_epochs=o.epochs,
                                                warmup_epochs=o.warmup_epochs, warmup_lr=o.warmup_lr, min_lr=o.min_lr,
                                                decay_milestones=o.decay_milestones, decay_rate=o.decay_rate,
                                                step_on_epochs=False, updates_per_epoch=self.steps_per_epoch)
        self.ema = ModelEmaV3(student, decay=cfg.ema_decay) if cfg.ema_decay else None
        self.ddp = (torch.nn.parallel.DistributedDataParallel(self.model) if self.world > 1 else self.model)
        self.out = Path(cfg.output)
        self.epoch, self.step = 0, 0
        self.result: dict = {}  # the last finished epoch's figures (what final.json reports)
        self.amp = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.amp and self.device.type == "cuda"
                    else contextlib.nullcontext())

    # --- what it trains from -------------------------------------------------------------

    def _open_cache(self, needs) -> Manifest:
        self.cache_url, self.store, m = open_cache(self.cfg, needs)
        return m

    def _teacher_context(self, m: Manifest | None) -> TeacherContext:
        if m is None:
            return TeacherContext(num_classes=self.num_classes)
        tail, stats = (load_pack(self.store), load_input_stats(self.store)) if m.tpp else (None, None)
        return TeacherContext.from_manifest(m, tail, stats)

    def _cache_dataset(self, logits: bool) -> CacheDataset:
        cfg, online = self.cfg, self.teacher is not None
        return CacheDataset(
            self.store, size=self.size, mean=self.mean, std=self.std,
            logits=logits and not online, taps=() if online else self.taps,
            view_policy=cfg.data.view_policy, seed=cfg.seed,
            shuffle_buffer=cfg.data.shuffle_buffer, drop_uneven=cfg.data.drop_uneven,
            allow_partial=cfg.cache.allow_partial, input_storage_options=cfg.data.input_storage_options,
            teacher_input=(self.teacher.input_size, self.teacher.mean, self.teacher.std) if online else None,
            fresh_views=online and cfg.online_teacher.views == "fresh", max_views=cfg.data.max_views,
            aug_repeats=cfg.data.aug_repeats,
        )

    def _tar_dataset(self) -> TarDataset:
        """No cache: supervised on ``data.train_urls``; refused for methods that need a teacher."""
        cfg, needs = self.cfg, needs_of(self.cfg.methods, self.cfg.method_options)
        if needs != Needs():
            raise ConfigError(f"methods {cfg.methods!r} need a teacher's targets, and this run has no cache: give "
                              "cache.url (a cache of the teacher), or train with methods: ce")
        d = cfg.data
        return TarDataset(d.train_urls, recipe=d.views or ViewRecipe(), size=self.size, mean=self.mean, std=self.std,
                          num_classes=self.num_classes, seed=cfg.seed, shuffle_buffer=d.shuffle_buffer,
                          drop_uneven=d.drop_uneven, storage_options=d.input_storage_options)

    # --- one step ---------------------------------------------------------------------

    def targets(self, batch) -> TeacherTargets:
        """The batch's teacher targets: decoded cache rows, or the live teacher's outputs put through
        the very extraction and decoding the cache went through (same code, same rounding)."""
        if self.teacher is None:
            return batch.targets
        seed = self.manifest.config.views.seed
        views = [(seed, t, p, v) for t, p, v in zip(batch.tars.tolist(), batch.positions.tolist(), batch.views.tolist(),
                                                    strict=True)]
        rows, _ = encode_targets(self.teacher(batch.x_teacher, views), self.manifest.codecs())
        return TeacherTargets.decode(rows, self.manifest, device=self.device, taps=self.taps)

    def labels(self, batch) -> torch.Tensor:
        """[B] class indices, or for a cache of mixed views [B, C] mixed labels (timm's ``mixup_target`` with the
        recorded λ, :func:`student.batch.mix_labels`; methods smooth them as they smooth class indices)."""
        if self.manifest is not None and self.manifest.config.views.mix is not None:
            return batch.soft_labels(self.num_classes).to(self.device)
        return batch.labels.to(self.device)

    def train_step(self, batch) -> dict[str, float]:
        labels = self.labels(batch)
        if self.batch_mix is not None:  # the teacher and the student see the same mixed batch
            x, x_teacher, labels = self.batch_mix(batch.x, batch.x_teacher, labels, self.step)
            batch = batch._replace(x=x, x_teacher=x_teacher)
        targets = self.targets(batch)
        with self.amp:
            out = self.ddp(batch.x.to(self.device), targets, labels, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        if self.cfg.optim.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad)
        self.optimizer.step()
        self.step += 1
        self.scheduler.step_update(self.step)
        if self.ema is not None:
            self.ema.update(self.model.student, step=self.step)
        return {k: float(v.detach()) for k, v in out.items() if k != "output"}

    # --- the loop -----------------------------------------------------------------------

    def fit(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            (self.out / "config.yaml").write_text(yaml.safe_dump(self.cfg.model_dump(mode="json"), sort_keys=False))
        resumed = self.load(self.out / "last.pt")
        final = self.out / "final.json"
        if self.epoch >= self.cfg.optim.epochs and final.exists():
            return json.loads(final.read_text())  # already trained: nothing to redo
        t_fit = time.time()
        for epoch in range(self.epoch, self.cfg.optim.epochs):
            if not resumed:
                self.dataset.set_epoch(epoch)
            resumed = False
            self.epoch = epoch
            self.model.train()
            bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch}", unit="step",
                       disable=not self.progress or self.rank != 0)
            t0, seen, loss_sum, steps = time.time(), 0, 0.0, 0
            join = self.ddp.join() if self.world > 1 else contextlib.nullcontext()
            with join:
                for batch in self.dataset.loader(self.cfg.data.batch_size, num_workers=self.cfg.data.num_workers,
                                                 device=self.device):
                    logs = self.train_step(batch)
                    crash_point(f"train:step {self.step}")
                    seen += len(batch.labels)
                    loss_sum, steps = loss_sum + float(logs["loss"]), steps + 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{logs['loss']:.3f}")
                    if self.step % self.cfg.log_every == 0:
                        self.log({"epoch": epoch, "step": self.step, "lr": self.optimizer.param_groups[0]["lr"],
                                  **logs})
                    if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                        self.save(self.out / "last.pt", epoch_done=False)
                        self._checkpointed(final=False)
            bar.close()
            result = {"epoch": epoch, "step": self.step, "samples_per_s": seen / max(time.time() - t0, 1e-9)}
            if self.cfg.data.val_urls:
                result |= {f"val_{k}": v for k, v in self.evaluate().items()}
            self.log(result)
            if self.rank == 0:  # one line per epoch, also without progress bars (batch jobs' logs)
                val = f", val top-1 {result['val_top1']:.2f}%" if "val_top1" in result else ""
                tqdm.write(f"epoch {epoch + 1}/{self.cfg.optim.epochs}: loss {loss_sum / max(steps, 1):.4f}, "
                           f"{result['samples_per_s']:.1f} samples/s{val}", file=sys.stderr)
            self.epoch, self.result = epoch + 1, result
            self.save(self.out / "last.pt", epoch_done=True)
            self._checkpointed(final=False)
        result = {**self.result, "train_seconds": time.time() - t_fit, "cache": self._cache_ref()}
        if self.rank == 0:
            plot_metrics(self.out / "metrics.jsonl", self.out / "curves.png")
            atomic_write(LocalFileSystem(), str(final), json.dumps(result, indent=1).encode())
        self._checkpointed(final=True)
        return result

    def _checkpointed(self, final: bool) -> None:
        if self.on_checkpoint is not None:
            self.on_checkpoint(self, final)

    def evaluate(self) -> dict[str, float]:
        model = self.ema.module if self.ema is not None else self.model.student
        d = self.cfg.data
        batches = eval_loader(d.val_urls, self.size, self.mean, self.std, 2 * d.batch_size, d.eval_crop_pct,
                              num_classes=self.num_classes)
        return evaluate(model, batches, self.device)

    def log(self, record: dict) -> None:
        if self.rank == 0:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"time": time.time(), **record}) + "\n")

    # --- checkpoints (tensors and plain values: torch.load(weights_only=True)) ------------

    def save(self, path: Path, *, epoch_done: bool) -> None:
        data = self.dataset.state_dict()
        if self.world > 1:
            states = [None] * self.world
            dist.all_gather_object(states, data)
            data = merge_states(states)
        if self.rank != 0:
            return
        ckpt = {"model": self.model.student.state_dict(), "methods": self.model.methods.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "epoch": self.epoch, "step": self.step, "data": None if epoch_done else data,
                "ema": self.ema.module.state_dict() if self.ema is not None else None,
                "result": self.result,  # the last finished epoch's (final.json, if a kill comes before it)
                "cache": self._cache_ref(weights=True)}
        buf = io.BytesIO()
        torch.save(ckpt, buf)
        atomic_write(LocalFileSystem(), str(path), buf.getvalue())  # a crash mid-write never leaves a broken last.pt

    def _cache_ref(self, weights: bool = False) -> dict | None:
        """What a result or checkpoint records of the cache it trained from (None: no cache)."""
        m = self.manifest
        if m is None:
            return None
        ref = {"url": self.cache_url, "identity": m.identity or m.content_identity()}
        return {**ref, "weights_sha256": m.teacher.weights_sha256} if weights else ref

    def _check_resume_cache(self, path: Path, ck: dict) -> None:
        if ck["cache"]["weights_sha256"] != self.manifest.teacher.weights_sha256:
            raise CacheMismatchError(f"{path} was trained against another teacher's cache ({ck['cache']['url']}); "
                                     "use a new output folder")
        was, now = ck["cache"].get("identity"), self.manifest.identity or self.manifest.content_identity()
        if ck["data"] is not None and was is not None and was != now:
            raise CacheMismatchError(
                f"{path} stopped mid-epoch on cache {was[:12]}…, which has grown into {now[:12]}… since (more views or "
                "tars): the epoch's sample order cannot be replayed. Resume from an epoch boundary checkpoint or use "
                "a new output folder.")

    def load(self, path: Path) -> bool:
        """Resume from ``path`` if it exists; True when it resumes mid-epoch (data position restored)."""
        if not path.exists():
            return False
        ck = torch.load(path, map_location=self.device, weights_only=True)
        if (ck["cache"] is None) != (self.manifest is None):
            raise CacheMismatchError(f"{path} was trained {'without' if ck['cache'] is None else 'with'} a cache, this "
                                     "run is not; use a new output folder")
        if self.manifest is not None:
            self._check_resume_cache(path, ck)
        self.model.student.load_state_dict(ck["model"])
        self.model.methods.load_state_dict(ck["methods"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        if self.ema is not None and ck["ema"] is not None:
            self.ema.module.load_state_dict(ck["ema"])
        self.epoch, self.step = int(ck["epoch"]), int(ck["step"])
        self.result = dict(ck.get("result") or {})  # older checkpoints have none
        if ck["data"] is not None:
            self.dataset.load_state_dict(ck["data"])
            return True
        return False


def plot_metrics(jsonl: Path, png: Path) -> None:
    """Loss per logged step and validation top-1 per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in jsonl.read_text().splitlines()] if jsonl.exists() else []
    steps = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["epoch"], r["val_top1"]) for r in rows if "val_top1" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    if steps:
        a.plot(*zip(*steps, strict=True))
    a.set(xlabel="step", ylabel="total loss", title="training loss")
    if evals:
        b.plot(*zip(*evals, strict=True), marker="o")
    b.set(xlabel="epoch", ylabel="val top-1 (%)", title="validation")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)

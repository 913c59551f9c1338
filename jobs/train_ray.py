"""``kdcache train --ray``: the student trainer as DDP ranks on Ray Train workers.

The workers run the very :class:`student.trainer.Trainer` that ``kdcache train`` and ``torchrun`` run: Ray
Train's ``TorchTrainer`` starts ``ray.num_workers`` processes on any nodes of the cluster, sets up the process
group (gloo on CPUs, NCCL on GPUs) and the rank variables, and the trainer splits the cache over ranks ×
DataLoader workers as it does under torchrun. What Ray adds:

* **checkpoints through Ray Train**: each time the trainer writes ``last.pt`` (every epoch, and every
  ``checkpoint_every`` steps), rank 0 reports a copy of it as a Ray Train checkpoint (kept under
  ``ray.storage_path``, default ``OUTPUT/ray``; a folder every node reaches or ``s3://…``); the last one also holds
  ``final.json``, ``metrics.jsonl``, ``config.yaml`` and ``curves.png``. They are the trainer's own files: tensors
  and plain values, loaded with ``torch.load(weights_only=True)``, no pickled objects.
* **failures**: a worker or node that dies makes Ray restart the whole group (``ray.max_failures`` times); every
  rank then starts from the last reported checkpoint, copied into its local output folder, so the run ends with
  the weights of an uninterrupted one (bit-identical on CPUs: the mid-epoch data position is in ``last.pt``).
  Rerunning the same command (same output and storage path) resumes the same way; a finished run returns at once.
* **the driver**: attaches to ``--address`` / ``RAY_ADDRESS`` (``ray job submit … -- kdcache train CONFIG --ray``)
  or starts a private local Ray, checks the config against the cache before any worker starts, and leaves the final
  files in ``output`` on the machine it runs on.

Why Ray Train and not our own actors: it already does the worker group, the process group and its rendezvous,
restarts on failure and checkpoint storage on any pyarrow filesystem; the trainer stays one code path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem

from pipeline.store import atomic_write
from student.config import RayOptions, TrainConfig

from .config_io import finished_run

RESULT_FILES = ("final.json", "metrics.jsonl", "config.yaml", "curves.png")  # besides last.pt, in the final checkpoint


def run_name(output: Path) -> str:
    """Ray Train's run name for an output folder: the same folder resumes the same run under a shared storage path."""
    return f"{output.name}-{hashlib.sha256(str(output).encode()).hexdigest()[:8]}"


def train_on_ray(cfg: TrainConfig, *, address: str | None = None, progress: bool = True) -> dict:
    """Train ``cfg`` under Ray Train (options: ``cfg.ray``, else :class:`RayOptions`' defaults); returns the
    ``final.json`` figures, which it also leaves in ``cfg.output`` here."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.job import init_ray
    from student.trainer import open_cache

    opts = cfg.ray or RayOptions()
    out = Path(cfg.output).resolve()
    cfg = cfg.model_copy(update={"output": str(out), "ray": opts})
    done = finished_run(out, cfg.model_dump(mode="json"))
    if done is not None:  # as the trainer does without Ray: a finished run is not redone, and Ray is not started
        print(f"{out} holds this run, finished (final.json): nothing to train", file=sys.stderr)
        return done
    if cfg.cache is not None:
        open_cache(cfg)  # a config that cannot train stops here, not after max_failures restarts of the workers
    init_ray(address)
    threads = int((opts.resources_per_worker or {}).get("CPU", 1))
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "cwd": os.getcwd(), "threads": threads},
        scaling_config=ScalingConfig(num_workers=opts.num_workers, use_gpu=opts.use_gpu,
                                     resources_per_worker=opts.resources_per_worker),
        run_config=RunConfig(name=run_name(out), storage_path=opts.storage_path or str(out / "ray"),
                             failure_config=FailureConfig(max_failures=opts.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             logging_config=LoggingConfig(log_level="WARNING")),  # not a line per report
        torch_config=TorchConfig(backend="nccl" if opts.use_gpu else "gloo"),
    )
    result = trainer.fit()
    if result.checkpoint is not None:  # the final files, also when rank 0 ran on another node
        with result.checkpoint.as_directory() as d:
            _copy_into(Path(d), out, ("last.pt", *RESULT_FILES))
    final = out / "final.json"
    if not final.exists():
        raise RuntimeError(f"Ray Train ended without {final}")
    return json.loads(final.read_text())


def _copy_into(src: Path, dst: Path, names: tuple[str, ...]) -> None:
    """Copy the ``names`` present in ``src`` into ``dst``, each whole or not at all (``atomic_write``)."""
    for name in names:
        f, target = src / name, dst / name
        if not f.exists() or target.exists() and target.samefile(f):
            continue
        atomic_write(LocalFileSystem(), str(target), f.read_bytes())


def _worker(config: dict) -> None:
    """One rank: its local output gets the run's last checkpoint (if Ray restored one), then the trainer runs."""
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train.torch import get_device

    from student.trainer import Trainer

    if os.path.isdir(config["cwd"]):  # relative paths of the config mean what they meant where it was submitted
        os.chdir(config["cwd"])
    torch.set_num_threads(config["threads"])
    cfg = TrainConfig.model_validate(config["config"])
    ctx = ray.train.get_context()
    ck = ray.train.get_checkpoint()
    if ck is not None and ctx.get_local_rank() == 0:  # one copy per node; the ranks of a node share the folder
        with ck.as_directory() as d:
            _copy_into(Path(d), Path(cfg.output), ("last.pt", "final.json"))
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    device = get_device() if cfg.ray.use_gpu else torch.device("cpu")
    Trainer(cfg, progress=False, device=device, on_checkpoint=_report).fit()


def _report(trainer, final: bool) -> None:
    """Every rank reports (Ray Train's report is collective); rank 0 attaches a copy of ``last.pt`` (and, at the end,
    the run's result files) as the checkpoint."""
    import ray.train
    from ray.train import Checkpoint

    metrics = {"epoch": trainer.epoch, "step": trainer.step,
               **{k: v for k, v in trainer.result.items() if isinstance(v, int | float)}}
    if trainer.rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as d:
        for name in ("last.pt", *(RESULT_FILES if final else ())):
            if (trainer.out / name).exists():
                shutil.copyfile(trainer.out / name, Path(d) / name)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))

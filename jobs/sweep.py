"""``kdcache sweep SWEEP.yaml``: many students from one cache at once, as Ray tasks on the cluster.

A sweep file names a base training config and the trials: a ``grid`` over config keys (every combination) and/or
a list of ``trials`` (each a set of key overrides; with a grid, each is combined with every grid point)::

    base: train_demo_vitkd.yaml          # a training config (path relative to this file), or the config inline
    output: runs/sweep-vitkd              # one run folder per trial, and the table (relative: to the current folder)
    grid:
      student.model: [resnet18, mobilenetv3_small_100]
      seed: [0, 1, 2]
    trials:
      - {methods: ce}
      - {methods: ce+kd, method_options.kd.weight: 1.0}
    resources: {CPU: 1}                   # per trial (default: one GPU each where the cluster has GPUs, else 1 CPU)
    max_retries: 1                        # reruns of a trial whose worker or node died

Every trial is :class:`student.trainer.Trainer` in a Ray task with those resources, its output
``OUTPUT/<trial name>``, reading the same cache read-only. A trial that raises is reported in the table (its error's
last line) without stopping the others; one whose process or node dies is rerun ``max_retries`` times (Ray's task
retries; it resumes from its ``last.pt``). Rerunning the sweep skips the trials whose run folder holds a
``final.json`` of the same config, and reruns failed or unfinished ones. The table goes to ``OUTPUT/results.json``
and ``OUTPUT/results.png``: trial, student, methods, the overrides, val top-1, train seconds, status.

Why Ray tasks and not Ray Tune: a sweep here is a fixed list of independent trainings with no search algorithm,
early stopping or scheduler; tasks give resources, retries and concurrency with nothing else to configure, and
each trial stays a plain ``kdcache train`` run folder (``kdcache eval`` works on it).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from storage_schemas.errors import ConfigError

from .config_io import finished_run, format_errors, load_config


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: str | dict[str, Any] = Field(description="the training config: a YAML path (relative to the sweep file) "
                                                   "or the config inline")
    output: str = Field(description="folder for one run folder per trial and results.json / results.png (relative: "
                                    "to the current folder, like a training config's paths)")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="config key → values; every combination")
    trials: list[dict[str, Any]] = Field(default_factory=list, description="explicit trials: config key → value")
    resources: dict[str, float] | None = Field(None, description="Ray resources per trial (default: 1 GPU where "
                                                                  "the cluster has GPUs, else 1 CPU)")
    max_retries: int = Field(1, ge=0, description="reruns of a trial whose worker or node died")


def load_sweep(path: str | Path) -> SweepSpec:
    path = Path(path)
    try:
        d = yaml.safe_load(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"sweep file {path} does not exist") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    try:
        spec = SweepSpec.model_validate(d or {})
    except ValidationError as e:
        raise ConfigError(format_errors(e, str(path))) from None
    if isinstance(spec.base, str) and not Path(spec.base).is_absolute():
        spec.base = str(path.parent / spec.base)
    spec.output = str(Path(spec.output).resolve())  # like a training config's paths: relative to where it runs
    return spec


def expand(spec: SweepSpec) -> list[dict[str, Any]]:
    """The trials' overrides: each explicit trial (or none) combined with each grid point (or none)."""
    keys = list(spec.grid)
    points = [dict(zip(keys, values, strict=True)) for values in itertools.product(*spec.grid.values())]
    return [{**t, **p} for t in (spec.trials or [{}]) for p in points]


def trial_name(overrides: dict[str, Any]) -> str:
    """A readable, filesystem-safe folder name for a trial, with a hash of its overrides (names stay unique)."""
    text = ",".join(f"{k}={v}" for k, v in overrides.items()) or "base"
    readable = re.sub(r"[^A-Za-z0-9_.=,+-]+", "_", text)[:80]
    return f"{readable}-{hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:6]}"


def trial_configs(spec: SweepSpec) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """``(name, overrides, config as JSON)`` per trial, each validated here: a bad key stops the sweep before
    anything runs, naming the trial."""
    from student.config import TrainConfig

    base: dict[str, Any] = dict(spec.base) if isinstance(spec.base, dict) else {}
    path = spec.base if isinstance(spec.base, str) else None
    out = []
    for overrides in expand(spec):
        name = trial_name(overrides)
        sets = [f"{k}={json.dumps(v)}" for k, v in overrides.items()] + [f"output={Path(spec.output) / name}"]
        try:
            cfg = load_config(TrainConfig, path, sets, base=base)
        except ConfigError as e:
            raise ConfigError(f"trial {name}: {e}") from None
        out.append((name, overrides, cfg.model_dump(mode="json")))
    return out


def _train(config: dict, cwd: str) -> dict:
    """One trial, in its Ray task; relative paths of the config mean what they meant where the sweep was started."""
    import ray
    import torch

    from student.config import TrainConfig
    from student.trainer import Trainer

    if os.path.isdir(cwd):
        os.chdir(cwd)
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    if cpus:
        torch.set_num_threads(max(1, int(cpus)))
    return Trainer(TrainConfig.model_validate(config), progress=False).fit()


def run_sweep(path: str | Path, *, address: str | None = None, log=print) -> list[dict]:
    """Run every trial of the sweep file not finished yet; returns the results table (also written to OUTPUT)."""
    import ray

    from pipeline.job import init_ray

    spec = load_sweep(path)
    trials = trial_configs(spec)
    out = Path(spec.output)
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    todo = []
    for name, overrides, config in trials:
        row = {"trial": name, "student": config["student"]["model"], "methods": config["methods"],
               "overrides": overrides, "output": config["output"]}
        done = finished_run(Path(config["output"]), config)
        if done is not None:
            rows[name] = {**row, "status": "done before", "top1": done.get("val_top1"),
                          "train_seconds": done.get("train_seconds")}
        else:
            rows[name] = row
            todo.append((name, config))
    log(f"sweep {path}: {len(trials)} trials, {len(trials) - len(todo)} finished before, {len(todo)} to run")
    own_ray = todo and not ray.is_initialized()
    if todo:
        init_ray(address)
        res = spec.resources or ({"GPU": 1} if ray.cluster_resources().get("GPU") else {"CPU": 1})
        opts = {"num_cpus": res.get("CPU", 0 if "GPU" in res else 1), "num_gpus": res.get("GPU", 0),
                "resources": {k: v for k, v in res.items() if k not in ("CPU", "GPU")} or None,
                "max_retries": spec.max_retries, "retry_exceptions": False}
        remote = ray.remote(_train).options(**opts)
        futures = {remote.remote(config, os.getcwd()): name for name, config in todo}
        t0 = time.time()
        while futures:
            ready, _ = ray.wait(list(futures), num_returns=1)
            name = futures.pop(ready[0])
            try:
                result = ray.get(ready[0])
                rows[name].update(status="done", top1=result.get("val_top1"),
                                  train_seconds=result.get("train_seconds"))
            except Exception as e:  # the trial's own error (or its retries exhausted): reported, the others go on
                cause = getattr(e, "cause", None) or e
                rows[name].update(status="failed", error=f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1]}"
                                  if str(cause).strip() else type(cause).__name__)
            r = rows[name]
            log(f"[{len(todo) - len(futures)}/{len(todo)}] {name}: {r['status']}"
                + (f", val top-1 {r['top1']:.2f}%" if r.get("top1") is not None else "")
                + (f" ({r['error']})" if "error" in r else "") + f" — {time.time() - t0:.0f} s")
    if own_ray:  # the trials' output reaches this process on Ray's thread, its "[repeated Nx …]" lines seconds
        ray.shutdown()  # later: none may come after the sweep's own last lines
    table = [rows[name] for name, _, _ in trials]
    (out / "results.json").write_text(json.dumps(table, indent=1))
    plot_sweep(table, out / "results.png")
    return table


def format_sweep(table: list[dict]) -> str:
    lines = ["| trial | student | methods | val top-1 | train s | status |", "|---|---|---|---|---|---|"]
    for r in table:
        top1 = f"{r['top1']:.2f}" if r.get("top1") is not None else "—"
        secs = f"{r['train_seconds']:.0f}" if r.get("train_seconds") is not None else "—"
        status = r["status"] + (f": {r['error']}" if "error" in r else "")
        lines.append(f"| {r['trial']} | {r['student']} | {r['methods']} | {top1} | {secs} | {status} |")
    return "\n".join(lines)


def plot_sweep(table: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in table if r.get("top1") is not None]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(done) + 2), 4))
    ax.bar(range(len(done)), [r["top1"] for r in done])
    ax.set_xticks(range(len(done)), [r["trial"].rsplit("-", 1)[0] for r in done], rotation=60, ha="right",
                  fontsize=7)
    ax.set(ylabel="val top-1 (%)", title=f"sweep: {len(done)} of {len(table)} trials finished")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)

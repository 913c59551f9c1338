"""Step 4 of ``kdcache demo``: students trained from the one cache, each with KD and without.

The line-up is ``jobs/configs/demo_students.yaml``. Every run goes through the student
trainer (:class:`student.trainer.Trainer`) exactly as ``kdcache train`` would; the baseline
is the same config with methods ``ce`` only, so the two differ in the teacher's targets and
nothing else. A run's folder name carries a hash of its whole config and of the teacher's
weights, so a rerun reuses finished runs (``final.json``) and resumes unfinished ones, and a
changed config or teacher trains anew instead of reusing stale results.
"""

from __future__ import annotations

import copy
import hashlib
import json
import statistics
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict

from .config_io import ConfigError

STUDENTS = Path(__file__).parent / "configs" / "demo_students.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DemoRun(_Strict):
    label: str
    method: str
    epochs: dict[Literal["full", "quick"], int]
    config: dict[str, Any]
    quick: dict[str, Any] = {}  # config keys that differ under --quick


class DemoStudents(_Strict):
    common: dict[str, Any] = {}
    quick: dict[str, Any] = {}  # common keys that differ under --quick
    runs: list[DemoRun]

    def config(self, run: DemoRun, quick: bool) -> dict:
        """``run``'s training config: common keys, the run's own, then under ``quick`` both quick overrides."""
        c = merge_config(self.common, run.config)
        return merge_config(merge_config(c, self.quick), run.quick) if quick else c


def load_students(path: Path = STUDENTS) -> DemoStudents:
    try:
        return DemoStudents.model_validate(yaml.safe_load(path.read_text()))
    except Exception as e:
        raise ConfigError(f"{path}: {e}") from e


def merge_config(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = merge_config(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def baseline_of(config: dict) -> dict:
    """The same training config without the teacher: methods ``ce`` with the run's CE options
    (label smoothing…) but full weight, since there is nothing left to balance it against."""
    ce = {k: v for k, v in config.get("method_options", {}).get("ce", {}).items() if k != "weight"}
    return {**config, "methods": "ce", "method_options": {"ce": ce} if ce else {}}


def run_config(config: dict, *, cache_url: str, val_urls: str, runs_dir: Path, epochs: int, seed: int,
               teacher_sha256: str) -> dict:
    """A complete TrainConfig dict; its output folder is named by a hash of everything that shapes the run."""
    cfg = merge_config(config, {"cache": {"url": cache_url}, "seed": seed, "data": {"val_urls": val_urls},
                          "optim": {"epochs": epochs}})
    digest = hashlib.sha256(json.dumps([cfg, teacher_sha256], sort_keys=True).encode()).hexdigest()[:8]
    methods = cfg["methods"] if isinstance(cfg["methods"], str) else "+".join(cfg["methods"])
    name = f"{cfg['student']['model']}-{methods.replace('+', '_')}-e{epochs}-s{seed}-{digest}"
    return {**cfg, "output": str(Path(runs_dir) / name)}


def train_one(cfg: dict, progress: bool = True, threads: int | None = None) -> dict:
    import torch

    from student.config import TrainConfig
    from student.trainer import Trainer

    if threads:
        torch.set_num_threads(threads)
    result = Trainer(TrainConfig.model_validate(cfg), progress=progress).fit()
    return {"top1": result["val_top1"], "top5": result.get("val_top5"),
            "train_seconds": result.get("train_seconds"), "output": cfg["output"]}


def train_students(*, cache_url: str, val_urls: str, runs_dir: Path, quick: bool, seeds: list[int],
                   teacher_sha256: str, spec: DemoStudents | None = None, jobs: int = 1) -> list[dict]:
    """Train every run of the line-up (KD and baseline) for every seed; one summary row per run. ``jobs`` > 1
    trains that many runs at once, each in its own process with an equal share of the CPU threads; their
    progress bars are off, each run prints its epochs' lines."""
    spec = spec or load_students()
    todo = []  # (row index, kind, config), in the order the line-up lists them
    for i, run in enumerate(spec.runs):
        config = spec.config(run, quick)
        for seed in seeds:
            for kind, c in (("baseline", baseline_of(config)), ("kd", config)):
                todo.append((i, kind, run_config(c, cache_url=cache_url, val_urls=val_urls, runs_dir=runs_dir,
                                                 epochs=run.epochs["quick" if quick else "full"], seed=seed,
                                                 teacher_sha256=teacher_sha256)))

    def announce(i: int, kind: str, cfg: dict) -> None:
        print(f"[4/4] student {spec.runs[i].label}, {kind} ({cfg['methods']}), seed {cfg['seed']}, "
              f"{cfg['optim']['epochs']} epochs → {cfg['output']}", flush=True)

    if jobs > 1:
        import multiprocessing as mp
        import os
        from concurrent.futures import ProcessPoolExecutor, as_completed

        threads = max(1, (os.cpu_count() or jobs) // jobs)
        print(f"[4/4] {len(todo)} student runs, {jobs} at a time ({threads} thread{'s' * (threads > 1)} each)",
              flush=True)
        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(train_one, cfg, False, threads): n for n, (_, _, cfg) in enumerate(todo)}
            results: list = [None] * len(todo)
            for k, f in enumerate(as_completed(futures), 1):
                n = futures[f]
                results[n] = f.result()
                i, kind, cfg = todo[n]
                print(f"[4/4] {k}/{len(todo)} done: {spec.runs[i].label}, {kind}, seed {cfg['seed']}: "
                      f"{results[n]['top1']:.2f}% val top-1 in {results[n]['train_seconds'] or 0:.0f} s", flush=True)
    else:
        results = []
        for i, kind, cfg in todo:
            announce(i, kind, cfg)
            results.append(train_one(cfg))
    rows = []
    for i, run in enumerate(spec.runs):
        config = spec.config(run, quick)
        epochs = run.epochs["quick" if quick else "full"]
        res: dict[str, list[dict]] = {"kd": [], "baseline": []}
        for (j, kind, _), result in zip(todo, results, strict=True):
            if j == i:
                res[kind].append(result)
        base = [r["top1"] for r in res["baseline"]]
        kd = [r["top1"] for r in res["kd"]]
        # baseline and KD runs of one seed share initial weights and data order: the noise of the gain is the
        # spread of the per-seed (paired) gains, not that of either arm, whose seeds also differ in how well
        # the student trains at all (README, "the demo's rule")
        gains = [k - b for k, b in zip(kd, base, strict=True)]
        gain, spread = statistics.mean(kd) - statistics.mean(base), _std(gains)
        rows.append({
            "student": run.label, "model": config["student"]["model"], "method": run.method,
            "methods": config["methods"], "epochs": epochs,
            "seeds": [{"seed": s, "baseline_top1": b, "kd_top1": k} for s, b, k in zip(seeds, base, kd, strict=True)],
            "baseline_top1": statistics.mean(base), "kd_top1": statistics.mean(kd), "gain": gain,
            "baseline_std": _std(base), "kd_std": _std(kd), "gain_std": spread,
            "beyond_noise": gain > 2 * spread if len(seeds) > 1 else None,
            "train_seconds": {k: sum(r["train_seconds"] or 0.0 for r in v) for k, v in res.items()},
        })
    return rows


def _std(xs: list[float]) -> float:
    """Sample standard deviation over seeds (0 for one seed)."""
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def format_table(teacher: dict, cache: dict, rows: list[dict]) -> str:
    """The demo's closing table: teacher, each student's baseline / KD (mean ± sample std over seeds) and
    gain, a gain within twice the std of its per-seed gains marked ``~`` (inside seed noise), time, cache size."""
    seeds = [s["seed"] for s in rows[0]["seeds"]] if rows else []
    several = len(seeds) > 1
    lines = [f"teacher  {teacher['model']}: {teacher['top1']:.2f}% val top-1",
             f"cache    {cache['bytes_total'] / 1e6:.1f} MB, {cache['bytes_per_view'] / 1e3:.1f} kB per view, "
             f"{cache['num_views']} views per sample",
             f"students (val top-1 %, mean{' ± std' if several else ''} of {len(seeds)} "
             f"seed{'s' if several else ''} {seeds}):",
             f"  {'student':<22}{'method':<12}{'epochs':>7}{'baseline':>15}{'KD':>15}{'gain':>9}{'train s':>9}"]
    for r in rows:
        t = r["train_seconds"]["baseline"] + r["train_seconds"]["kd"]
        b, k = (f"{r[f'{x}_top1']:.2f}" + (f" ± {r[f'{x}_std']:.2f}" if several else "") for x in ("baseline", "kd"))
        mark = "~" if r.get("beyond_noise") is False else " "
        lines.append(f"  {r['student']:<22}{r['method']:<12}{r['epochs']:>7}{b:>15}{k:>15}{r['gain']:>+8.2f}{mark}"
                     f"{t:>9.0f}")
    if several:
        lines.append("  ~ gain within twice the std of the per-seed gains (same seed: same initial weights and data "
                     "order): not told apart from seed noise")
    else:
        lines.append("  one seed: gains not told apart from seed noise (--seeds 0 1 2 measures the spread)")
    return "\n".join(lines)


def plot_results(teacher: dict, rows: list[dict], png: Path) -> None:
    """Baseline and KD top-1 per student/method (error bars: std over seeds), teacher as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 1.8 * len(rows)), 3.8))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["baseline_top1"] for r in rows], 0.4,
           yerr=[r["baseline_std"] for r in rows], label="no KD (ce)", color="#999999")
    ax.bar([x + 0.2 for x in xs], [r["kd_top1"] for r in rows], 0.4,
           yerr=[r["kd_std"] for r in rows], label="KD from the cache", color="#1f77b4")
    ax.axhline(teacher["top1"], color="#d62728", ls="--", label=f"teacher {teacher['top1']:.1f}%")
    ax.set_xticks(list(xs), [f"{r['student']}\n{r['method']}" for r in rows], fontsize=8)
    lo = min([r["baseline_top1"] for r in rows] + [r["kd_top1"] for r in rows] + [teacher["top1"]])
    ax.set_ylim(max(0.0, lo - 10), 100)
    ax.set_ylabel("val top-1 (%)")
    seeds = [s["seed"] for s in rows[0]["seeds"]] if rows else []
    ax.set_title(f"digits: students distilled from one cache (seeds {seeds})")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)

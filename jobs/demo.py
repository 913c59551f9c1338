"""``kdcache demo``: the embedded default end to end on the bundled digits.

1. digits → WebDataset shards; 2. train a small ViT teacher, save safetensors;
3. cache it with the Ray job (local Ray, local files); 4. train students from the cache
(``jobs/configs/demo_students.yaml``), each with KD and without; 5. a table, ``results.json``
and ``results.png`` in the workdir.
Finished steps are reused on a rerun (the cache resumes, trained students are not retrained);
``--force`` redoes them all.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from safetensors.torch import save_file

from storage_schemas.config import CacheConfig

from .config_io import load_config
from .demo_students import format_table, plot_results, train_students
from .report import format_summary

CONFIG = Path(__file__).parent / "configs" / "demo.yaml"
# The teacher trains on views of the cache's recipe under another seed, so it is at home
# on the views it is cached with without ever seeing the cached views themselves. 50 epochs
# (~3.5 min on 2 cores): val 97.8 %, 86.5 % on the cached views; 30 epochs gave 93.6 %, too
# weak to teach a ResNet-18 that reaches 96-98 % alone.
TEACHER_SEED = 1000
TEACHER_EPOCHS = {"quick": 6, "full": 50}


def out_dir(workdir: Path, quick: bool) -> Path:
    """Where teacher, cache, runs and results go: ``--quick`` keeps its own (weaker teacher, 2
    views) under ``WORKDIR/quick`` so that a later full run never reuses or collides with them."""
    return workdir / "quick" if quick else workdir


def demo_config(workdir: Path, quick: bool) -> CacheConfig:
    out = out_dir(workdir, quick)
    sets = [f"input.urls={workdir}/data/train-{{000000..000003}}.tar", f"output.url={out}/cache.zarr",
            f"teacher.checkpoint={out}/teacher.safetensors"]
    if quick:
        sets.append("views.num_views=2")
    return load_config(CacheConfig, CONFIG, sets)


def train_teacher(cfg: CacheConfig, workdir: Path, out: Path, epochs: int) -> dict:
    """The demo's teacher, trained by the student trainer without a cache (supervised, fresh views of
    the cache's recipe under ``TEACHER_SEED`` every epoch); its weights saved as the cache's checkpoint."""
    from student.config import TrainConfig
    from student.trainer import Trainer

    data = workdir / "data"
    t = cfg.teacher
    run = TrainConfig.model_validate({
        "student": {"model": t.model, "model_kwargs": t.model_kwargs, "input_size": t.input_size, "mean": t.mean,
                    "std": t.std},
        "methods": "ce", "method_options": {"ce": {"label_smoothing": 0.1}},
        "data": {"train_urls": f"{data}/train-{{000000..000003}}.tar", "val_urls": f"{data}/val-{{000000..000001}}.tar",
                 "views": cfg.views.model_copy(update={"seed": TEACHER_SEED}).model_dump(mode="json"),
                 "batch_size": 64, "eval_crop_pct": 1.0},
        "optim": {"opt": "adamw", "lr": 2e-3, "weight_decay": 0.05, "epochs": epochs, "warmup_epochs": 2},
        "seed": 0, "output": str(out / "teacher-run"), "log_every": 50,
    })
    t0 = time.time()
    trainer = Trainer(run)
    result = trainer.fit()
    student = trainer.model.student
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, t.checkpoint)
    info = {"model": t.model, "model_kwargs": t.model_kwargs, "top1": result["val_top1"], "epochs": epochs,
            "train_seconds": time.time() - t0, "checkpoint": t.checkpoint, "run": run.output}
    (out / "teacher.json").write_text(json.dumps(info, indent=1))
    return info


def run_demo(workdir: str, *, quick: bool = False, force: bool = False, address: str | None = None,
             seeds: list[int] = (0,), students: bool = True) -> dict:
    from pipeline.digits import write_digits
    from pipeline.job import run_cache_job

    wd = Path(workdir).resolve()
    wd.mkdir(parents=True, exist_ok=True)
    cfg = demo_config(wd, quick)
    out = out_dir(wd, quick)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if force or not (wd / "data" / "val-000001.tar").exists():
        print(f"[1/4] writing digits shards to {wd / 'data'}")
        write_digits(str(wd / "data"))
    else:
        print(f"[1/4] digits shards already in {wd / 'data'}")
    teacher_json = out / "teacher.json"
    if force and (out / "teacher-run").exists():
        shutil.rmtree(out / "teacher-run")  # else the trainer would resume the finished run
    if force or not teacher_json.exists() or not Path(cfg.teacher.checkpoint).exists():
        print("[2/4] training the ViT teacher on digits")
        teacher = train_teacher(cfg, wd, out, epochs=TEACHER_EPOCHS["quick" if quick else "full"])
    else:
        teacher = json.loads(teacher_json.read_text())
        print(f"[2/4] teacher already trained ({teacher['top1']:.2f}% val top-1)")
    if force:
        for old in (Path(cfg.output.url), out / "runs"):
            if old.exists():
                shutil.rmtree(old)
    print(f"[3/4] caching the teacher with the Ray job → {cfg.output.url}")
    m = run_cache_job(cfg, address=address)
    s = m.summary()
    print(format_summary(s, cfg.output.url))
    cache = {"url": cfg.output.url, "bytes_total": s["bytes_total"], "bytes_per_view": s["bytes_per_view"],
             "num_views": s["num_views"], "teacher_top1_on_views": s["teacher"]["top1"]}
    rows = []
    if students:
        rows = train_students(cache_url=cfg.output.url, val_urls=f"{wd}/data/val-{{000000..000001}}.tar",
                              runs_dir=out / "runs", quick=quick, seeds=list(seeds),
                              teacher_sha256=m.teacher.weights_sha256)
    results = {
        "teacher": {"model": teacher["model"], "model_kwargs": teacher["model_kwargs"], "top1": teacher["top1"]},
        "cache": cache,
        "students": rows,
        "quick": quick,
        "seconds": time.time() - t0,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if rows:
        plot_results(results["teacher"], rows, out / "results.png")
    print(format_table(results["teacher"], cache, rows))
    print(f"results in {out / 'results.json'}" + (f" and {out / 'results.png'}" if rows else "")
          + f" ({results['seconds']:.0f} s)")
    return results

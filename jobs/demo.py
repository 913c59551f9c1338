"""``kdcache demo``: the embedded default end to end on the bundled digits.

1. digits → WebDataset shards; 2. the teacher: the small ViT shipped with the package
(``jobs/assets/demo_teacher.*``, trained by :func:`train_teacher` — ``--train-teacher`` trains it again,
the recorded command and seed reproduce it); 3. cache it with the Ray job (local Ray, local files);
4. train students from the cache (``jobs/configs/demo_students.yaml``), each with KD and without;
5. a table, ``results.json`` and ``results.png`` in the workdir.
Finished steps are reused on a rerun (the cache resumes, trained students are not retrained);
``--force`` redoes them all.
"""

from __future__ import annotations

import hashlib
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
ASSETS = Path(__file__).parent / "assets"
SHIPPED_TEACHER = ASSETS / "demo_teacher.safetensors"  # and demo_teacher.json: how it was trained, its accuracy
# The teacher trains on views of the cache's recipe under another seed, so it is at home
# on the views it is cached with without ever seeing the cached views themselves.
TEACHER_SEED = 1000
TEACHER_EPOCHS = 50


def out_dir(workdir: Path, quick: bool) -> Path:
    """Where teacher, cache, runs and results go: ``--quick`` keeps its own (2 views, 1-epoch
    students) under ``WORKDIR/quick`` so that a later full run never reuses or collides with them."""
    return workdir / "quick" if quick else workdir


def demo_config(workdir: Path, quick: bool) -> CacheConfig:
    out = out_dir(workdir, quick)
    sets = [f"input.urls={workdir}/data/train-{{000000..000003}}.tar", f"output.url={out}/cache.zarr",
            f"teacher.checkpoint={out}/teacher.safetensors"]
    if quick:
        sets.append("views.num_views=2")
    return load_config(CacheConfig, CONFIG, sets)


def shipped_teacher() -> dict:
    """The record of the teacher shipped with the package (``demo_teacher.json``), its weights checked."""
    info = json.loads(SHIPPED_TEACHER.with_suffix(".json").read_text())
    sha = hashlib.sha256(SHIPPED_TEACHER.read_bytes()).hexdigest()
    if sha != info["sha256"]:
        raise RuntimeError(f"{SHIPPED_TEACHER}: sha256 {sha[:12]}… is not the recorded {info['sha256'][:12]}…; "
                           "the package is damaged: reinstall it, or run the demo with --train-teacher")
    return info


def install_teacher(cfg: CacheConfig, out: Path) -> dict:
    """Copy the shipped teacher to the cache's checkpoint path and write its ``teacher.json``."""
    info = shipped_teacher()
    shutil.copyfile(SHIPPED_TEACHER, cfg.teacher.checkpoint)
    t = {**info, "checkpoint": cfg.teacher.checkpoint, "shipped": True}
    (out / "teacher.json").write_text(json.dumps(t, indent=1))
    return t


def train_teacher(cfg: CacheConfig, workdir: Path, out: Path, epochs: int = TEACHER_EPOCHS) -> dict:
    """The demo's teacher, trained by the student trainer without a cache (supervised, fresh views of
    the cache's recipe under ``TEACHER_SEED`` every epoch); its weights saved as the cache's checkpoint.
    This is how the shipped teacher was made (its record names the command)."""
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
            "train_seconds": time.time() - t0, "checkpoint": t.checkpoint, "run": run.output,
            "seed": run.seed, "views_seed": TEACHER_SEED, "shipped": False,
            "sha256": hashlib.sha256(Path(t.checkpoint).read_bytes()).hexdigest()}
    (out / "teacher.json").write_text(json.dumps(info, indent=1))
    return info


def run_demo(workdir: str, *, quick: bool = False, force: bool = False, address: str | None = None,
             seeds: list[int] = (0,), students: bool = True, train: bool = False, jobs: int = 2) -> dict:
    """The demo in ``workdir``; ``train``: train the teacher here instead of using the shipped one."""
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
    have = json.loads(teacher_json.read_text()) if teacher_json.exists() else None
    if have and Path(cfg.teacher.checkpoint).exists() and not force and have.get("shipped", False) != train:
        teacher = have
        print(f"[2/4] teacher already in place ({teacher['top1']:.2f}% val top-1)")
    else:
        if Path(cfg.output.url).exists():  # a cache of another teacher: its job would refuse the new one
            shutil.rmtree(cfg.output.url)
        if train:
            print(f"[2/4] training the ViT teacher on digits ({TEACHER_EPOCHS} epochs)")
            teacher = train_teacher(cfg, wd, out)
        else:
            teacher = install_teacher(cfg, out)
            print(f"[2/4] the shipped ViT teacher ({teacher['top1']:.2f}% val top-1; --train-teacher trains it "
                  f"again, {teacher['train_seconds'] / 60:.0f} min here)")
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
                              teacher_sha256=m.teacher.weights_sha256, jobs=jobs)
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

"""The two questions of every cache user, answered on the digits: how many views to cache, and
which codec. Student accuracy, mean and std over seeds, all runs in one process on one device.

Teacher, data and recipe are the demo's (``kdcache demo --no-students`` is run first if needed).
Student: the demo's ViT 4×64 with ``ce+kd+vitkd`` — it reads the logits and three feature taps,
so both the logits codec and the feature codec matter — same epochs, optimiser and seeds in
every row.

- Views: one 8-view cache; the student trains on its first 1, 2, 4, 8 views (``data.max_views``:
  view v is seeded by (seed, tar, position, v), so the first N views of an 8-view cache are
  exactly an N-view cache), against online KD with the teacher in the loop on fresh views
  every epoch (the bound that more cached views approach).
- Codec: 4 views; fp16 vs int8 features (logits top-5) and top-2 / top-5 / all logits (fp16
  features). The digits have 10 classes, so "all" is top-10; top-2 stands in for a small k.

    python -m bench.kd_studies --workdir kdcache-demo --epochs 12 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from jobs.config_io import load_config
from jobs.demo import demo_config, run_demo
from jobs.demo_students import load_students, merge_config, run_config, train_one
from pipeline.job import run_cache_job
from pipeline.store import CacheStore
from storage_schemas.config import CacheConfig

from .common import OUT, device_name, markdown_table, write_results

VIEWS = (1, 2, 4, 8)
CODECS = {  # name: (cache --set overrides, 4 views each)
    "fp16 feats, top-5": [],
    "int8 feats, top-5": ["targets.feature_dtype=int8"],
    "fp16 feats, top-2": ["targets.logits.k=2"],
    "fp16 feats, all logits": ["targets.logits={mode: full}"],
}


def study_cache(wd: Path, name: str, sets: list[str]) -> tuple[str, str]:
    """Build (or resume) a variant of the demo cache; returns its URL and teacher sha256."""
    cfg = demo_config(wd, quick=False)
    cfg = load_config(CacheConfig, None, sets, base=cfg.model_dump(mode="json")
                      | {"output": {"url": str(wd / "studies" / f"{name}.zarr")}})
    print(f"cache {name}: {cfg.output.url}", flush=True)
    m = run_cache_job(cfg, progress=False, log=lambda s: None)
    return cfg.output.url, m.teacher.weights_sha256


def student_config() -> dict:
    spec = load_students()
    vit = next(r for r in spec.runs if r.method == "ViTKD")
    return merge_config(merge_config(spec.common, vit.config), {"methods": "ce+kd+vitkd"})


def train_seeds(wd: Path, cache_url: str, sha: str, epochs: int, seeds: list[int], extra: dict) -> dict:
    accs, secs = [], []
    for seed in seeds:
        cfg = run_config(merge_config(student_config(), extra), cache_url=cache_url, runs_dir=wd / "studies" / "runs",
                         val_urls=f"{wd}/data/val-{{000000..000001}}.tar", epochs=epochs, seed=seed,
                         teacher_sha256=sha)
        r = train_one(cfg)
        accs.append(r["top1"])
        secs.append(r["train_seconds"] or 0.0)
        print(f"  {extra or 'cached'} seed {seed}: {r['top1']:.2f}%", flush=True)
    return {"top1_mean": statistics.mean(accs), "top1_std": statistics.pstdev(accs), "top1_per_seed": accs,
            "train_seconds": sum(secs)}


def run(wd: Path, epochs: int, seeds: list[int]) -> dict:
    t0 = time.time()
    if not (wd / "teacher.json").exists():
        run_demo(str(wd), students=False)  # data, teacher and the demo cache
    url8, sha = study_cache(wd, "views8", ["views.num_views=8"])
    views = []
    for v in VIEWS:
        views.append({"views": str(v), **train_seeds(wd, url8, sha, epochs, seeds, {"data": {"max_views": v}})})
    online = {"online_teacher": {"checkpoint": str(wd / "teacher.safetensors"), "views": "fresh"}}
    views.append({"views": "online, fresh every epoch", **train_seeds(wd, url8, sha, epochs, seeds, online)})
    codecs = []
    for name, sets in CODECS.items():
        url, sha_c = (url8, sha) if not sets else study_cache(wd, name.replace(" ", "").replace(",", "_"),
                                                               ["views.num_views=4", *sets])
        s = CacheStore(url, read_only=True).read_manifest().summary()
        extra = {} if sets else {"data": {"max_views": 4}}  # fp16/top-5: 4 views of the 8-view cache
        codecs.append({"codec": name, "bytes_per_view": s["bytes_per_view"],
                       **train_seeds(wd, url, sha_c, epochs, seeds, extra)})
    return {"device": device_name(), "student": "ViT 4×64 @ 32 px, ce+kd+vitkd", "epochs": epochs, "seeds": seeds,
            "views": views, "codecs": codecs, "seconds": time.time() - t0}


def plot(res: dict, views_png: Path, codecs_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cached = [r for r in res["views"] if r["views"].isdigit()]
    online = next(r for r in res["views"] if not r["views"].isdigit())
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.errorbar([int(r["views"]) for r in cached], [r["top1_mean"] for r in cached],
                yerr=[r["top1_std"] for r in cached], marker="o", capsize=3, label="cached KD")
    ax.axhline(online["top1_mean"], color="#d62728", ls="--", label="online KD, fresh views")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="cached views per sample", ylabel="student val top-1 (%)",
           title=f"views ({res['device']}, seeds {res['seeds']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(views_png, dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = range(len(res["codecs"]))
    ax.bar(xs, [r["top1_mean"] for r in res["codecs"]], yerr=[r["top1_std"] for r in res["codecs"]], capsize=3)
    ax.set_xticks(list(xs), [f"{r['codec']}\n{r['bytes_per_view'] / 1e3:.1f} kB/view" for r in res["codecs"]],
                  fontsize=7)
    lo = min(r["top1_mean"] for r in res["codecs"])
    ax.set_ylim(max(0.0, lo - 10), min(100.0, max(r["top1_mean"] for r in res["codecs"]) + 5))
    ax.set(ylabel="student val top-1 (%)", title=f"target codec ({res['device']})")
    fig.tight_layout()
    fig.savefig(codecs_png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="kdcache-demo", type=Path)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a = p.parse_args(argv)
    res = run(a.workdir.resolve(), a.epochs, a.seeds)
    print(f"\nstudent top-1 against cached views ({res['student']}, {res['epochs']} epochs, seeds {res['seeds']})")
    print(markdown_table(res["views"], ["views", "top1_mean", "top1_std", "train_seconds"]))
    print("\nstudent top-1 against target codec (4 views)")
    print(markdown_table(res["codecs"], ["codec", "bytes_per_view", "top1_mean", "top1_std"]))
    plot(res, OUT / "kd_views.png", OUT / "kd_codecs.png")
    print(f"written {write_results('kd_studies', res)}, {OUT / 'kd_views.png'}, {OUT / 'kd_codecs.png'}")
    return res


if __name__ == "__main__":
    main()

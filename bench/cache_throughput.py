"""Caching throughput against the teacher's forward pass alone, and bytes per view per codec.

For each teacher the same views are (1) replayed once into batches and pushed through
the teacher alone (the baseline: what the accelerator must do anyway), (2) cached by
the in-process unit runner (decode + augment + forward + compress + Zarr write), and
(3) cached by the full Ray job (index pass, actors, manifest; Ray start-up excluded).
Ratios are job throughput / forward throughput, measured in the same run on the same
device: in the job's steady state (time inside units, from their completion records) and
end to end (with the fixed start-up, which a real multi-hour job amortises). Target:
≥ 0.90 where the teacher's forward dominates, as it does for real teachers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import ray
import torch

from pipeline.job import init_ray, run_cache_job
from pipeline.stages import batched
from pipeline.store import CacheStore
from pipeline.tars import iter_samples
from pipeline.teacher import Teacher
from pipeline.unit import UnitRunner
from pipeline.views import apply_view, sample_view
from storage_schemas.config import CacheConfig

from .common import OUT, device_name, digits_data, markdown_table, write_results

# (label, timm name, kwargs, input size, taps): a tiny teacher where decode dominates,
# and a ViT-S/16 at 224 px where the forward dominates, as it does for real teachers.
TEACHERS = [
    ("vit-digits-32px", "vit_tiny_patch16_224",
     {"img_size": 32, "patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3, "num_classes": 10}, 32,
     [{"name": "block0", "index": 0}, {"name": "block1", "index": 1}, {"name": "final", "index": -1, "norm": True}]),
    ("vit_small-224px", "vit_small_patch16_224", {"num_classes": 10}, 224,
     [{"name": "final", "index": -1, "norm": True}]),
]
CODECS = [("topk5+fp16", {"logits": {"mode": "topk", "k": 5}, "feature_dtype": "fp16"}),
          ("topk5+int8", {"logits": {"mode": "topk", "k": 5}, "feature_dtype": "int8"}),
          ("full+fp16", {"logits": {"mode": "full"}, "feature_dtype": "fp16"})]


def config(data: dict, out: str, model: str, kwargs: dict, size: int, taps: list, targets: dict, views: int,
           shards: str) -> CacheConfig:
    return CacheConfig.model_validate({
        "input": {"urls": shards}, "output": {"url": out},
        "teacher": {"model": model, "model_kwargs": kwargs, "input_size": size},
        "views": {"num_views": views, "randaugment": "rand-m9-mstd0.5-inc1", "hflip": 0.0},
        "targets": {**targets, "features": taps},
        "job": {"batch_size": 64, "cpus_per_actor": torch.get_num_threads(), "chunk_rows": 128},
    })


def forward_only(cfg: CacheConfig, urls: list[str]) -> tuple[float, int]:
    """Seconds for the teacher alone over the exact batches the job will run."""
    teacher = Teacher(cfg.teacher, cfg.targets.features)
    batches = []
    for shard, url in enumerate(urls):
        for view in range(cfg.views.num_views):
            xs = []
            for s in iter_samples(url):
                rec = sample_view(cfg.views, tar=shard, position=s.position, view=view, width=s.image.width,
                                  height=s.image.height)
                xs.append(apply_view(s.image, rec, cfg.views, size=teacher.input_size, mean=teacher.mean,
                                     std=teacher.std))
            batches += [torch.stack(b) for b in batched(xs, cfg.job.batch_size)]
    teacher(batches[0])  # warm-up
    t0 = time.perf_counter()
    for x in batches:
        teacher(x)
    return time.perf_counter() - t0, sum(len(b) for b in batches)


def run(views: int = 2, num_shards: int = 2) -> dict:
    init_ray(None)
    rows, bytes_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = digits_data(tmp)
        shards = data["train"].replace("{000000..000003}", f"{{000000..{num_shards - 1:06d}}}")
        from pipeline.tars import expand_urls

        urls = expand_urls(shards)
        for label, model, kwargs, size, taps in TEACHERS:
            cfg = config(data, str(tmp / f"{label}.zarr"), model, kwargs, size, taps, dict(CODECS[0][1]),
                         views, shards)
            fwd_s, n = forward_only(cfg, urls)
            t0 = time.perf_counter()
            run_cache_job(cfg, progress=False, log=lambda s: None)
            job_s = time.perf_counter() - t0
            # time spent inside units (in the actor), from the completion records: the job's
            # steady state; the rest is fixed start-up (index pass, actor start, teacher load)
            in_units_s = sum(r.seconds for r in CacheStore(cfg.output.url).read_unit_records())
            # the unit runner in-process, no Ray in the loop: rerunning a unit rewrites the same bytes
            runner = UnitRunner(cfg.output.url, {}, num_threads=torch.get_num_threads())
            t0 = time.perf_counter()
            for s in range(len(urls)):
                for v in range(views):
                    runner(s, v)
            unit_s = time.perf_counter() - t0
            rows.append({"teacher": label, "views": n, "forward_only_views_per_s": n / fwd_s,
                         "unit_runner_views_per_s": n / unit_s, "ray_job_views_per_s": n / job_s,
                         "unit_runner_vs_forward": fwd_s / unit_s, "ray_job_vs_forward": fwd_s / job_s,
                         "ray_job_in_units_vs_forward": fwd_s / in_units_s,
                         "ray_job_fixed_overhead_s": job_s - in_units_s})
        label, model, kwargs, size, taps = TEACHERS[0]
        for codec, targets in CODECS:
            cfg = config(data, str(tmp / f"codec-{codec}.zarr"), model, kwargs, size, taps, targets, views, shards)
            s = run_cache_job(cfg, progress=False, log=lambda s: None).summary()
            bytes_rows.append({"codec": codec, "teacher": label, "bytes_per_view": s["bytes_per_view"],
                               **{f"{k}_bytes_per_view": v["bytes_per_view"] for k, v in s["targets"].items()
                                  if v.get("bytes_per_view") is not None},
                               **{f"{k}_cosine": v["fidelity"]["cosine_mean"] for k, v in s["targets"].items()
                                  if v.get("fidelity")}})
        growth_rows = growth(data, tmp, shards)
    return {"device": device_name(), "throughput": rows, "bytes": bytes_rows, "growth": growth_rows,
            "cache_job_vs_teacher_forward": {r["teacher"]: r["ray_job_in_units_vs_forward"] for r in rows},
            "cache_job_end_to_end_vs_teacher_forward": {r["teacher"]: r["ray_job_vs_forward"] for r in rows}}


def growth(data: dict, tmp: Path, shards: str, base: tuple[int, int, int] = (2, 3, 2)) -> list[dict]:
    """Cost as views, taps and samples grow, one axis at a time from ``base`` = (views, taps, tars):
    bytes stored and seconds inside units (the job's steady state), each relative to the base."""
    label, model, kwargs, size, taps = TEACHERS[0]
    rows = []
    axes = [("views", v, (v, base[1], base[2])) for v in (1, 2, 4)] + \
           [("taps", n, (base[0], n, base[2])) for n in (1, 2, 3)] + \
           [("tars", n, (base[0], base[1], n)) for n in (1, 2, 4)]
    for axis, value, (views, ntaps, ntars) in axes:
        urls = shards.replace(f"{{000000..{base[2] - 1:06d}}}", f"{{000000..{ntars - 1:06d}}}")
        cfg = config(data, str(tmp / f"growth-{axis}-{value}.zarr"), model, kwargs, size, taps[-ntaps:],
                     dict(CODECS[0][1]), views, urls)
        s = run_cache_job(cfg, progress=False, log=lambda s: None).summary()
        secs = sum(r.seconds for r in CacheStore(cfg.output.url).read_unit_records())
        rows.append({"axis": axis, "value": value, "views": views, "taps": ntaps, "tars": ntars,
                     "num_views_cached": s["num_samples"] * views, "bytes_total": s["bytes_total"],
                     "seconds_in_units": secs})
    # growing in place: the 2-view cache (a copy) asked for 4 views computes only views 2 and 3
    src = next(r for r in rows if r["axis"] == "views" and r["views"] == 2)
    grown = tmp / "growth-grown.zarr"
    shutil.copytree(tmp / "growth-views-2.zarr", grown)
    cfg = config(data, str(grown), model, kwargs, size, taps[-base[1]:], dict(CODECS[0][1]), 4,
                 shards.replace(f"{{000000..{base[2] - 1:06d}}}", f"{{000000..{src['tars'] - 1:06d}}}"))
    before = {(r.tar, r.view) for r in CacheStore(str(grown)).read_unit_records()}
    s = run_cache_job(cfg, progress=False, log=lambda s: None).summary()
    secs = sum(r.seconds for r in CacheStore(str(grown)).read_unit_records() if (r.tar, r.view) not in before)
    rows.append({"axis": "grow 2→4 views in place", "value": 4, "views": 4, "taps": base[1], "tars": src["tars"],
                 "num_views_cached": s["num_samples"] * 4, "bytes_total": s["bytes_total"], "seconds_in_units": secs})
    for r in rows:
        b = next(x for x in rows if (x["views"], x["taps"], x["tars"]) == base)
        r["bytes_vs_base"], r["seconds_vs_base"] = r["bytes_total"] / b["bytes_total"], r["seconds_in_units"] / b["seconds_in_units"]
    fresh4 = next(r for r in rows if r["axis"] == "views" and r["views"] == 4)
    rows[-1]["seconds_vs_fresh_build"] = rows[-1]["seconds_in_units"] / fresh4["seconds_in_units"]
    return rows


def growth_only(num_shards: int = 2) -> dict:
    """Rerun only the growth table, keeping the rest of the last ``cache_throughput.json``."""
    init_ray(None)
    last = OUT / "cache_throughput.json"
    res = json.loads(last.read_text()) if last.exists() else {"device": device_name()}
    with tempfile.TemporaryDirectory() as tmp:
        data = digits_data(Path(tmp))
        shards = data["train"].replace("{000000..000003}", f"{{000000..{num_shards - 1:06d}}}")
        res["growth"] = growth(data, Path(tmp), shards)
    return res


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--growth-only", action="store_true",
                   help="rerun only the cost-growth table (keeps the other tables of the last run's JSON)")
    a = p.parse_args(argv)
    try:
        res = growth_only() if a.growth_only else run()
    finally:  # the Ray this benchmark started: its idle workers would share the CPU with what runs next
        ray.shutdown()
    if "throughput" not in res:
        print(markdown_table(res["growth"], ["axis", "value", "bytes_vs_base", "seconds_vs_base"]))
        return res
    print(f"\ncaching throughput on {res['device']} (views/s; ratio = job / teacher forward alone)")
    print(markdown_table(res["throughput"], ["teacher", "views", "forward_only_views_per_s",
                                             "unit_runner_views_per_s", "ray_job_views_per_s",
                                             "unit_runner_vs_forward", "ray_job_in_units_vs_forward",
                                             "ray_job_vs_forward", "ray_job_fixed_overhead_s"]))
    print("\nbytes per cached view, by codec")
    cols = sorted({k for r in res["bytes"] for k in r})
    print(markdown_table(res["bytes"], ["codec"] + [c for c in cols if c != "codec"]))
    print("\ncost growth (digits ViT teacher; one axis at a time from 2 views, 3 taps, 2 tars)")
    print(markdown_table(res["growth"], ["axis", "value", "num_views_cached", "bytes_total", "bytes_vs_base",
                                         "seconds_in_units", "seconds_vs_base", "seconds_vs_fresh_build"]))
    path = write_results("cache_throughput", res)
    print(f"\nwritten {path}")
    return res


if __name__ == "__main__":
    main()

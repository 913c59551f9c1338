"""Caching throughput against the teacher's forward pass alone, and bytes per view per codec.

For each teacher the same views are (1) replayed once into batches and pushed through
the teacher alone (the baseline: what the accelerator must do anyway), (2) cached by
the full Ray job (index pass, actors, manifest; Ray start-up excluded), and (3) cached again
by the in-process unit runner (decode + augment + forward + compress + Zarr write) over the
job's cache. Ratios are job throughput / forward throughput, measured in the same run on the
same device: in the job's steady state (time inside units, from their completion records) and
end to end (with the fixed start-up, which a real multi-hour job amortises). Goal: steady
state ≥ 0.90 where the teacher's forward dominates, as it does for real teachers (the ViT-S/16
at 224 px here); the tiny digits teacher, where decoding dominates, has no goal.

Forward and job are measured interleaved: after a warm-up (one forward batch, one untimed job
over one unit), each of ``--rounds`` rounds runs the first half of the forward batches, the job,
the unit runner over the job's fresh cache (rewriting it; it is deleted after), then the other
half of the forward batches, so that forward and job see the load of the same minutes of a
shared machine. Each ratio is computed within each round (paired) and reported as its median
over rounds and an interval for it (``bench.common.median_interval``: min–max of the per-round
ratios for 5–7 rounds); the goal's verdict is met, not met, or undecided when the interval
straddles 0.90. The bytes and cost-growth tables are single runs (bytes are deterministic;
growth is a shape, not a goal).

    python -m bench.cache_throughput                          # 5 rounds of 2 tars × 2 views (~40 min on 2 cores)
    python -m bench.cache_throughput --tars 1 --views 1       # 5 rounds of 1 unit (~12 min)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
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

from .common import (
    OUT,
    device_name,
    digits_data,
    judge,
    markdown_table,
    quantile,
    ratio_summary,
    spread,
    verdict_lines,
    with_spread,
    write_results,
)

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


def replay(cfg: CacheConfig, urls: list[str], teacher: Teacher, tars: Sequence[int] | None = None
           ) -> list[torch.Tensor]:
    """The exact batches ``[B, 3, H, W]`` the job will run: every view of every sample, as the job replays it
    (of the tars ``tars``, indices into ``urls``; default all)."""
    batches = []
    for shard in range(len(urls)) if tars is None else tars:
        url = urls[shard]
        for view in range(cfg.views.num_views):
            xs = []
            for s in iter_samples(url):
                rec = sample_view(cfg.views, tar=shard, position=s.position, view=view, width=s.image.width,
                                  height=s.image.height)
                xs.append(apply_view(s.image, rec, cfg.views, size=teacher.input_size, mean=teacher.mean,
                                     std=teacher.std))
            batches += [torch.stack(b) for b in batched(xs, cfg.job.batch_size)]
    return batches


def forward_seconds(teacher: Teacher, batches: list[torch.Tensor]) -> float:
    """Seconds for the teacher alone over ``batches``."""
    t0 = time.perf_counter()
    for x in batches:
        teacher(x)
    return time.perf_counter() - t0


def job_seconds(cfg: CacheConfig, num_tars: int, *, unit_runner: bool = True,
                warm_tars: int = 0) -> dict:
    """One caching job into the fresh ``cfg.output.url``, then (``unit_runner``) the unit runner over the same
    units: seconds end to end, inside units (from the completion records; those of the first ``warm_tars`` tars
    left out, the actor's warm-up) and of the unit runner."""
    t0 = time.perf_counter()
    run_cache_job(cfg, progress=False, log=lambda s: None)
    job_s = time.perf_counter() - t0
    # time spent inside units (in the actor), from the completion records: the job's
    # steady state; the rest is fixed start-up (index pass, actor start, teacher load)
    in_units_s = sum(r.seconds for r in CacheStore(cfg.output.url).read_unit_records() if r.tar >= warm_tars)
    if not unit_runner:
        return {"job": job_s, "in_units": in_units_s}
    # the unit runner in-process, no Ray in the loop: rerunning a unit rewrites the same bytes
    runner = UnitRunner(cfg.output.url, {}, num_threads=torch.get_num_threads())
    t0 = time.perf_counter()
    for s in range(num_tars):
        for v in range(cfg.views.num_views):
            runner(s, v)
    return {"job": job_s, "in_units": in_units_s, "unit_runner": time.perf_counter() - t0}


def throughput(label: str, make: Callable[..., CacheConfig], urls: list[str], tmp: Path,
               rounds: int) -> tuple[dict, dict]:
    """One teacher's throughput table row and its ratio summaries, over ``rounds`` paired rounds.

    ``make(out)`` gives the teacher's cache config writing to ``out``; ``make(out, views=, shards=)``
    a smaller one (the warm-up job's)."""
    cfg = make(str(tmp / f"{label}-warmup.zarr"), views=1, shards=urls[0])
    teacher = Teacher(cfg.teacher, cfg.targets.features)
    run_cache_job(cfg, progress=False, log=lambda s: None)  # warm-up: Ray Data and the actor path, one unit
    shutil.rmtree(cfg.output.url)
    cfg = make(str(tmp / f"{label}.zarr"))
    batches = replay(cfg, urls, teacher)
    n = sum(len(b) for b in batches)
    teacher(batches[0])  # warm-up
    half = len(batches) // 2
    secs = {"forward": [], "job": [], "in_units": [], "unit_runner": []}
    for r in range(rounds):
        # the job between the two halves of the forward pass: both see the load of the same minutes
        fwd = forward_seconds(teacher, batches[:half])
        cfg = make(str(tmp / f"{label}-round{r}.zarr"))
        for k, v in job_seconds(cfg, len(urls)).items():
            secs[k].append(v)
        shutil.rmtree(cfg.output.url)
        secs["forward"].append(fwd + forward_seconds(teacher, batches[half:]))
        print(f"{label} round {r + 1}/{rounds}: " + ", ".join(f"{k} {n / v[-1]:.1f} views/s" for k, v in secs.items()),
              flush=True)
    rate = {k: [n / s for s in v] for k, v in secs.items()}
    ratios = {"unit_runner_vs_forward": ratio_summary(rate["unit_runner"], rate["forward"]),
              "ray_job_vs_forward": ratio_summary(rate["job"], rate["forward"]),
              "ray_job_in_units_vs_forward": ratio_summary(rate["in_units"], rate["forward"])}
    row = {"teacher": label, "views": n, "rounds": rounds}
    for name, key in [("forward_only", "forward"), ("unit_runner", "unit_runner"), ("ray_job", "job"),
                      ("ray_job_in_units", "in_units")]:
        sp = spread(rate[key])
        row[f"{name}_views_per_s"], row[f"{name}_views_per_s_spread"] = sp["median"], sp
    row.update({k: v["median"] for k, v in ratios.items()})
    row.update({f"{k}_interval": v["interval"] for k, v in ratios.items()})
    row["ray_job_fixed_overhead_s"] = quantile([j - u for j, u in zip(secs["job"], secs["in_units"], strict=True)], 0.5)
    return row, ratios


GOALS = [("vit_small-224px", 0.90, "caching job in steady state ≥ 0.90 × the teacher's forward alone, "
                                   "ViT-S/16 @ 224 px (forward dominates)")]


def run(views: int = 2, num_shards: int = 2, rounds: int = 5) -> dict:
    # Ray starts its workers at nice 15 (the raylet's worker_niceness); the forward alone runs in this process at
    # nice 0, so on a loaded machine the job would get less CPU than its baseline. Same priority for both:
    os.environ.setdefault("RAY_worker_niceness", "0")
    init_ray(None)
    rows, spreads, bytes_rows = [], {}, []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = digits_data(tmp)
        shards = data["train"].replace("{000000..000003}", f"{{000000..{num_shards - 1:06d}}}")
        from pipeline.tars import expand_urls

        urls = expand_urls(shards)
        for label, model, kwargs, size, taps in TEACHERS:
            def make(out: str, views: int = views, shards: str = shards, model=model, kwargs=kwargs, size=size,
                     taps=taps) -> CacheConfig:
                return config(data, out, model, kwargs, size, taps, dict(CODECS[0][1]), views, shards)

            row, spreads[label] = throughput(label, make, urls, tmp, rounds)
            rows.append(row)
        label, model, kwargs, size, taps = TEACHERS[0]
        for codec, targets in CODECS:
            cfg = config(data, str(tmp / f"codec-{codec}.zarr"), model, kwargs, size, taps, targets, views, shards)
            s = run_cache_job(cfg, progress=False, log=lambda s: None).summary()
            bytes_rows.append({"codec": codec, "teacher": label, "bytes_per_view": s["bytes_per_view"],
                               **{f"{k}_bytes_per_view": v["bytes_per_view"] for k, v in s["targets"].items()
                                  if v.get("bytes_per_view") is not None},
                               **{f"{k}_cosine": v["fidelity"]["cosine_mean"] for k, v in s["targets"].items()
                                  if v.get("fidelity")}})
        # the growth table has its own base of 2 tars, whatever --tars is
        growth_rows = growth(data, tmp, data["train"].replace("{000000..000003}", "{000000..000001}"))
    steady = {t: r["ray_job_in_units_vs_forward"] for t, r in spreads.items()}
    return {"device": device_name(), "rounds": rounds, "throughput": rows, "bytes": bytes_rows,
            "growth": growth_rows,
            "cache_job_vs_teacher_forward": {t: v["median"] for t, v in steady.items()},
            "cache_job_end_to_end_vs_teacher_forward": {t: r["ray_job_vs_forward"]["median"] for t, r in spreads.items()},
            "ratios_spread": {"cache_job_vs_teacher_forward": steady,
                              "cache_job_end_to_end_vs_teacher_forward": {t: r["ray_job_vs_forward"]
                                                                          for t, r in spreads.items()},
                              "cache_unit_runner_vs_teacher_forward": {t: r["unit_runner_vs_forward"]
                                                                       for t, r in spreads.items()}},
            "verdicts": [judge(f"cache_job_vs_teacher_forward[{t}]", steady[t], target, goal)
                         for t, target, goal in GOALS]}


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


def table_rows(rows: list[dict]) -> list[dict]:
    """The throughput table: views/s as median (min–max) over rounds, ratios as median (interval)."""
    out = []
    for r in rows:
        row = {"teacher": r["teacher"], "views": r["views"], "rounds": r["rounds"]}
        for name in ("forward_only", "ray_job_in_units", "ray_job", "unit_runner"):
            sp = r[f"{name}_views_per_s_spread"]
            row[f"{name}_views_per_s"] = with_spread(sp["median"], sp["min"], sp["max"])
        for name in ("ray_job_in_units_vs_forward", "ray_job_vs_forward", "unit_runner_vs_forward"):
            row[name] = with_spread(r[name], *r[f"{name}_interval"])
        row["ray_job_fixed_overhead_s"] = r["ray_job_fixed_overhead_s"]
        out.append(row)
    return out


TABLE_COLUMNS = ["teacher", "views", "rounds", "forward_only_views_per_s", "ray_job_in_units_views_per_s",
                 "ray_job_views_per_s", "unit_runner_views_per_s", "ray_job_in_units_vs_forward",
                 "ray_job_vs_forward", "unit_runner_vs_forward", "ray_job_fixed_overhead_s"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--growth-only", action="store_true",
                   help="rerun only the cost-growth table (keeps the other tables of the last run's JSON)")
    p.add_argument("--rounds", type=int, default=5,
                   help="rounds, each: half the forward pass, the job, the unit runner, the other half "
                        "(5: interval coverage 0.94)")
    p.add_argument("--tars", type=int, default=2, choices=range(1, 5), metavar="{1..4}",
                   help="digits train tars per round (about 360 samples each)")
    p.add_argument("--views", type=int, default=2, help="views per sample per round (and in the bytes table)")
    a = p.parse_args(argv)
    if a.rounds < 1 or a.views < 1:
        p.error("--rounds and --views must be at least 1")
    try:
        res = growth_only() if a.growth_only else run(a.views, a.tars, a.rounds)
    finally:  # the Ray this benchmark started: its idle workers would share the CPU with what runs next
        ray.shutdown()
    if "throughput" not in res:
        print(markdown_table(res["growth"], ["axis", "value", "bytes_vs_base", "seconds_vs_base"]))
        return res
    print(f"\ncaching throughput on {res['device']} (views/s, median (min–max) over {res['rounds']} rounds; "
          "ratio = job / teacher forward alone, median (interval) of the per-round ratios)")
    print(markdown_table(table_rows(res["throughput"]), TABLE_COLUMNS))
    print("\n".join(verdict_lines(res["verdicts"])))
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

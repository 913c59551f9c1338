"""``kdcache``: the command line. Entry points only parse arguments and call."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from storage_schemas.config import CacheConfig

from .config_io import ConfigError, load_config
from .failures import exit_status, ray_is_up
from .report import format_ls, format_summary

DESCRIPTION = """\
kdcache: run a big timm teacher once over augmented WebDataset shards, cache its logits,
features and tail (ScaleKD TPP) to Zarr, and distil any number of students from the cache.

Commands:
  data     write a data set as WebDataset shards: digits (real, bundled) or synthetic (ImageNet-shaped)
  cache    run the caching job on Ray (local by default; --address for a cluster)
  inspect  summarise a cache (human or --json)
  ls       list every cache under a root URL: identity, teacher, dataset, views, targets, size, status
  verify   check every byte of a cache against its checksums, and (--teacher) against the live teacher
  export-wds  write a cache as plain WebDataset tars (original image + label + views + targets per sample)
  train    train a timm student from a cache (KD, ViTKD, ScaleKD); torchrun for DDP
  eval     top-1/top-5 of a trained student on validation tars
  demo     the embedded default end to end: data, teacher, cache, students with and without KD
"""


def _kv(s: str) -> tuple[str, str]:
    if "=" not in s:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {s!r}")
    k, v = s.split("=", 1)
    return k, v


def _storage_options(pairs: list[tuple[str, str]] | None) -> dict:
    import yaml

    return {k: yaml.safe_load(v) for k, v in (pairs or [])}


def cmd_data(a: argparse.Namespace) -> int:
    from pipeline.digits import write_digits

    out = write_digits(a.out, train_shards=a.train_shards, val_shards=a.val_shards, size=a.size)
    print(json.dumps(out, indent=1))
    return 0


def _size(s: str) -> tuple[int, int] | None:
    """``--size``: ``imagenet`` (drawn per image) or ``WxH``."""
    if s == "imagenet":
        return None
    w, x, h = s.lower().partition("x")
    if not (x and w.isdigit() and h.isdigit()):
        raise argparse.ArgumentTypeError(f"expected 'imagenet' or WIDTHxHEIGHT (e.g. 500x375), got {s!r}")
    return int(w), int(h)


def cmd_data_synthetic(a: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from pipeline.synthetic import check_arguments, write_synthetic

    check_arguments(classes=a.classes, images=a.images, val_images=a.val_images, per_tar=a.per_tar, size=a.size,
                    workers=a.workers)  # before the progress bar appears
    total = a.images + a.val_images
    with tqdm(total=total, desc="synthetic images", unit="img", disable=a.no_progress) as bar:
        out = write_synthetic(a.out, classes=a.classes, images=a.images, val_images=a.val_images,
                              per_tar=a.per_tar, size=a.size, seed=a.seed, workers=a.workers,
                              storage_options=_storage_options(a.storage_option), progress=bar.update)
    print(json.dumps(out, indent=1))
    return 0


def cmd_cache(a: argparse.Namespace) -> int:
    sets = list(a.set) + ([f"output.root={a.root}", "output.url=null"] if a.root else [])
    if a.for_methods:
        sets.append(f"targets.for=[{a.for_methods.replace('+', ',')}]")
    cfg = load_config(CacheConfig, a.config, sets)
    if cfg.targets.for_methods:
        from .cache_for import resolve_targets_for

        cfg = resolve_targets_for(cfg)
    # imported once the config is good: Ray and torch take seconds to import
    from pipeline.job import run_cache_job

    m = run_cache_job(cfg, address=a.address, progress=not a.no_progress, resume=a.resume)
    print(format_summary(m.summary(), cfg.output.url or _url_of(m, cfg.output.root, cfg.output.storage_options)))
    return 0


def _url_of(m, root: str, storage_options: dict) -> str:
    """Where under ``root`` the job put the cache ``m`` (found by its identity)."""
    from pipeline.catalog import discover

    ident = m.identity or m.content_identity()
    return next((e.url for e in discover(root, storage_options, missing_ok=True) if e.identity == ident), root)


def cmd_ls(a: argparse.Namespace) -> int:
    from pipeline.catalog import discover

    entries = discover(a.root, _storage_options(a.storage_option), max_depth=a.max_depth)
    if a.json:
        print(json.dumps([e.as_dict() for e in entries], indent=1))
    else:
        print(format_ls(entries))
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from pipeline.store import CacheStore

    store = CacheStore(a.url, _storage_options(a.storage_option), read_only=True)
    s = store.read_manifest(allow_partial=a.allow_partial).summary()
    print(json.dumps(s, indent=1) if a.json else format_summary(s, a.url))
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from pipeline.store import CacheStore
    from pipeline.verify import verify_cache

    store = CacheStore(a.url, _storage_options(a.storage_option), read_only=True)
    rep = verify_cache(store, teacher_checkpoint=a.teacher, samples=a.samples,
                       input_storage_options=_storage_options(a.input_storage_option), progress=not a.json)
    if a.json:
        print(json.dumps(rep.as_dict(), indent=1))
    else:
        print(f"{a.url}: " + ", ".join(f"{n} {k}" for k, n in rep.checked.items()))
        for p in rep.problems:
            print(f"  PROBLEM {p}")
        print("OK: every check passed" if rep.ok else f"FAILED: {len(rep.problems)} problem(s)")
    return 0 if rep.ok else 1


def cmd_export_wds(a: argparse.Namespace) -> int:
    from pipeline.export_wds import export_wds

    export_wds(a.url, a.out, storage_options=_storage_options(a.storage_option),
               out_storage_options=_storage_options(a.out_storage_option),
               input_storage_options=_storage_options(a.input_storage_option),
               allow_partial=a.allow_partial, progress=not a.no_progress)
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from student.config import TrainConfig
    from student.trainer import Trainer

    sets = list(a.set)
    if a.online_teacher:
        sets += [f"online_teacher.checkpoint={a.online_teacher}", f"online_teacher.views={a.online_views}"]
    cfg = load_config(TrainConfig, a.config, sets)
    if a.ray or cfg.ray is not None:
        if "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ:
            raise ConfigError(f"{a.config}: runs on Ray Train ({'--ray' if a.ray else 'its ray: section'}) and this "
                              "process was started by torchrun: use one of the two (drop --ray and the ray: section "
                              "under torchrun)")
        from .train_ray import train_on_ray

        result = train_on_ray(cfg, address=a.address, progress=not a.no_progress)
    else:
        result = Trainer(cfg, progress=not a.no_progress).fit()
    print(json.dumps(result, indent=1))
    return 0


def cmd_sweep(a: argparse.Namespace) -> int:
    from .sweep import format_sweep, run_sweep

    table = run_sweep(a.sweep, address=a.address, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_sweep(table))
    failed = [r["trial"] for r in table if r["status"] == "failed"]
    if failed:
        print(f"kdcache sweep: {len(failed)} of {len(table)} trials failed ({', '.join(failed)}); their errors are in "
              "the table; rerun the sweep to retry them (finished trials are skipped)", file=sys.stderr)
        return 1
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    import torch

    from student.config import TrainConfig
    from student.evaluate import eval_loader, evaluate
    from student.trainer import build_student

    out = Path(a.run)
    cfg = load_config(TrainConfig, out / "config.yaml")
    model, size, mean, std = build_student(cfg)
    ck = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(ck["ema"] if a.ema and ck.get("ema") else ck["model"])
    urls = a.val_urls or cfg.data.val_urls
    if not urls:
        raise ConfigError("no validation tars: pass --val-urls or set data.val_urls in the run's config")
    r = evaluate(model, eval_loader(urls, size, mean, std, a.batch_size, cfg.data.eval_crop_pct), torch.device("cpu"))
    print(json.dumps(r, indent=1))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(a.workdir, quick=a.quick, force=a.force, address=a.address, seeds=a.seeds,
             students=not a.no_students, train=a.train_teacher, jobs=a.jobs)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdcache", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true",
                   help="on an internal error (exit status 1), show its traceback (or set KDCACHE_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("data", help="write a data set as WebDataset shards: digits (real) or synthetic (ImageNet-shaped)",
                       description="Write a data set as ImageNet-style WebDataset tars: 'digits' (a small real one) or "
                                   "'synthetic' (ImageNet-shaped JPEGs, for tests and benchmarks at real shapes). "
                                   "See 'kdcache data NAME --help'.")
    dsub = d.add_subparsers(dest="name", required=True, metavar="NAME")
    dd = dsub.add_parser("digits", help="scikit-learn's digits (1797 real 8×8 images, 10 classes)",
                         description="Write scikit-learn's bundled digits (1797 real 8×8 images, 10 classes) as "
                                     "ImageNet-style WebDataset tars (KEY.png RGB, KEY.cls, KEY.json), train and "
                                     "val splits. Deterministic: the same bytes every time.")
    dd.add_argument("--out", required=True, help="output folder (local path or fsspec URL)")
    dd.add_argument("--train-shards", type=int, default=4)
    dd.add_argument("--val-shards", type=int, default=2)
    dd.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    dd.set_defaults(fn=cmd_data)
    ds = dsub.add_parser(
        "synthetic", help="ImageNet-shaped synthetic JPEGs (sizes, bytes, tars and classes like ImageNet's)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write procedurally generated JPEGs shaped like ImageNet as WebDataset tars, for tests and "
                    "benchmarks at real shapes without ImageNet:\n"
                    "  OUT/train-000000.tar … (and OUT/val-000000.tar … with --val-images), --per-tar samples a "
                    "tar (1,250 by default, as ImageNet's 1,024 training tars), each KEY.jpg + KEY.cls;\n"
                    "  sizes drawn like ImageNet's (most 500×375 or 375×500, the rest spread around them, every "
                    "side within 80..1000 px), or fixed with --size WxH;\n"
                    "  JPEG quality 90, about 110 KB at 500×375 (ImageNet's average size): smooth coloured fields, "
                    "detail and grain that compress like a photograph, plus shapes with hard edges;\n"
                    "  labels 0..CLASSES-1, balanced, in a seeded order; palette, texture orientation and shapes "
                    "depend on the class, so a student can learn them.\n"
                    "Deterministic: the same arguments give the same bytes (with the same Pillow/libjpeg). Prints "
                    "the train/val brace URLs, counts and bytes as JSON. About 40 images/s per "
                    "process on this project's 2-core machine.",
        epilog="examples:\n  kdcache data synthetic --out /data/syn --classes 1000 --images 5000 --val-images 500\n"
               "  kdcache data synthetic --out /tmp/tiny --classes 10 --images 40 --per-tar 20 --size 64x48\n"
               "  kdcache data synthetic --out s3://bkt/syn --images 1281167 --workers 16   # ImageNet's train size")
    ds.add_argument("--out", required=True, help="output folder (local path or fsspec URL)")
    ds.add_argument("--classes", type=int, default=1000, help="number of classes (default 1000)")
    ds.add_argument("--images", type=int, required=True, help="training images")
    ds.add_argument("--val-images", type=int, default=0, help="validation images (default 0: no val tars)")
    ds.add_argument("--per-tar", type=int, default=1250, help="samples per tar (default 1250)")
    ds.add_argument("--size", type=_size, default=None, metavar="imagenet|WxH",
                    help="image size: 'imagenet' draws each image's like ImageNet's (default), WxH fixes it")
    ds.add_argument("--seed", type=int, default=0, help="seed of sizes, content and label order (default 0)")
    ds.add_argument("--workers", type=int, default=1,
                    help="processes writing tars in parallel (default 1; not with memory:// outputs)")
    ds.add_argument("--storage-option", action="append", type=_kv, metavar="KEY=VALUE",
                    help="fsspec storage option for --out (repeatable)")
    ds.add_argument("--no-progress", action="store_true", help="no progress bar")
    ds.set_defaults(fn=cmd_data_synthetic)

    c = sub.add_parser("cache", help="run the caching job", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run the teacher once over every (input tar, view) work unit and write the "
                                   "targets to a Zarr cache. Reruns resume: finished units are skipped.\n"
                                   "Configs: jobs/configs/*.yaml (sections input, output, teacher, views, "
                                   "targets, job).",
                       epilog="examples:\n  kdcache cache jobs/configs/demo.yaml --set views.num_views=8\n"
                              "  kdcache cache CONFIG.yaml --for vitkd,scalekd --set targets.features=[]\n"
                              "  RAY_ADDRESS=auto kdcache cache jobs/configs/vitkd_deit3_base.yaml")
    c.add_argument("config", help="YAML config")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set output.url=s3://bkt/cache.zarr (repeatable)")
    c.add_argument("--for", dest="for_methods", default=None, metavar="METHODS",
                   help="cache what these KD methods need (comma-separated, e.g. vitkd,scalekd): their teacher taps, "
                        "logits and TPP tail are added to the config's targets (same as targets.for)")
    c.add_argument("--root", default=None, metavar="ROOT_URL",
                   help="instead of output.url: find a cache with the same identity under ROOT_URL and reuse it "
                        "(nothing recomputed), resume it or add the missing views; else extend one of the same "
                        "teacher/recipe/targets whose tars are a prefix of these; else create a new one there. "
                        "Says which.")
    c.add_argument("--resume", action="store_true",
                   help="take over the lease of a caching job that died while writing this cache (refused while "
                        "its heartbeat is fresher than job.lease_ttl_s)")
    c.add_argument("--address", default=None,
                   help="Ray cluster address (default: $RAY_ADDRESS, else a private local Ray instance)")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.set_defaults(fn=cmd_cache)

    i = sub.add_parser("inspect", help="summarise a cache",
                       description="Print a cache's status, teacher, sizes and per-target fidelity.")
    i.add_argument("url", help="cache URL (local path, s3://…)")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--allow-partial", action="store_true", help="also summarise a cache still being built")
    i.add_argument("--storage-option", action="append", type=_kv, metavar="KEY=VALUE",
                   help="fsspec storage option, e.g. endpoint_url=http://127.0.0.1:9000 (repeatable)")
    i.set_defaults(fn=cmd_inspect)

    ls = sub.add_parser("ls", help="list the caches under a root URL",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Every cache under ROOT_URL (local or s3://…, searched --max-depth folders deep), "
                                    "one line each: identity (a content key of teacher, dataset, view recipe and "
                                    "targets; any unique prefix of 6+ digits names the cache in a student config as "
                                    "cache.root + cache.id), status (complete, building, growing, starting, "
                                    "unreadable), teacher, dataset (fingerprint, samples × tars), views, size, "
                                    "created, targets, URL. Reads manifests only.",
                        epilog="examples:\n  kdcache ls ./caches\n  kdcache ls s3://team-kd/caches --json "
                               "--storage-option endpoint_url=http://127.0.0.1:9000")
    ls.add_argument("root", metavar="ROOT_URL", help="a folder of caches (any fsspec URL)")
    ls.add_argument("--json", action="store_true", help="machine-readable output (a list of objects)")
    ls.add_argument("--max-depth", type=int, default=3, help="folders to descend below ROOT_URL (default 3)")
    ls.add_argument("--storage-option", action="append", type=_kv, metavar="KEY=VALUE",
                    help="fsspec storage option (repeatable)")
    ls.set_defaults(fn=cmd_ls)

    v = sub.add_parser("verify", help="check a cache's integrity (and, with --teacher, its targets)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Checks the whole integrity chain: manifest.json against its sha256 sidecar, "
                                   "checksums.json against the manifest, every other object against checksums.json, "
                                   "every array shard against its unit's completion record; decodes every chunk "
                                   "(crc32c), checks records against the manifest (units, counts, valid rows, "
                                   "labels, stats). With --teacher, replays --samples cached views through the live "
                                   "teacher and compares its outputs with the stored rows. Exit 0 when all pass, "
                                   "1 when a problem is found (each named by its path), 2 on usage errors.",
                       epilog="examples:\n  kdcache verify kdcache-demo/cache.zarr\n"
                              "  kdcache verify kdcache-demo/cache.zarr --teacher kdcache-demo/teacher.safetensors "
                              "--samples 128")
    v.add_argument("url", help="the cache (any fsspec URL); opened read-only")
    v.add_argument("--teacher", default=None, help="the teacher checkpoint the cache was built from")
    v.add_argument("--samples", type=int, default=64, help="views to replay through the teacher (default 64)")
    v.add_argument("--storage-option", action="append", type=_kv, metavar="KEY=VALUE", help="fsspec option (cache)")
    v.add_argument("--input-storage-option", action="append", type=_kv, metavar="KEY=VALUE",
                   help="fsspec option for the input tars (with --teacher)")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.set_defaults(fn=cmd_verify)

    x = sub.add_parser("export-wds", help="write a cache as plain WebDataset tars",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Write the cache at CACHE_URL as WebDataset tars under OUT_URL, one per input tar "
                                   "(shard-000000.tar, …), readable with the webdataset package alone. Per sample, "
                                   "under its original key: the original image bytes (KEY.jpg/png/…), KEY.cls, "
                                   "KEY.views.json (the view records, one per view) and KEY.NAME.npy for each target "
                                   "array, shaped [num_views, ...], stored bytes (no dequantisation). Skipped samples "
                                   "are left out. Also cache-manifest.json, a done-record per tar, and export.json "
                                   "(written last). Reruns keep finished tars; an OUT_URL holding another cache's "
                                   "export is refused.",
                       epilog="examples:\n  kdcache export-wds kdcache-demo/cache.zarr ./wds-export\n"
                              "  kdcache export-wds s3://bkt/caches/in1k.zarr s3://bkt/wds/in1k "
                              "--storage-option endpoint_url=http://127.0.0.1:9000")
    x.add_argument("url", metavar="CACHE_URL", help="the cache (any fsspec URL); opened read-only")
    x.add_argument("out", metavar="OUT_URL", help="folder for the tars (any fsspec URL)")
    x.add_argument("--storage-option", action="append", type=_kv, metavar="KEY=VALUE", help="fsspec option (cache)")
    x.add_argument("--out-storage-option", action="append", type=_kv, metavar="KEY=VALUE",
                   help="fsspec option for OUT_URL (repeatable)")
    x.add_argument("--input-storage-option", action="append", type=_kv, metavar="KEY=VALUE",
                   help="fsspec option for the input tars, read for the original image bytes (repeatable)")
    x.add_argument("--allow-partial", action="store_true",
                   help="export an unfinished cache: the tars whose every view is cached")
    x.add_argument("--no-progress", action="store_true", help="no progress bar")
    x.set_defaults(fn=cmd_export_wds)

    t = sub.add_parser("train", help="train a student from a cache", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train any timm student from a cache, without the teacher. Methods compose "
                                   "(methods: ce+kd+vitkd); each has its own options (method_options.NAME.KEY). "
                                   "Resumes from OUTPUT/last.pt. Mixup/CutMix come from the cache: a cache built with "
                                   "views.mix replays its mixes (mixed labels too); data.mixup/data.cutmix may only "
                                   "restate them, since the teacher's output on a mixed image is not a mix of its "
                                   "outputs on the two images.",
                       epilog="examples:\n  kdcache train jobs/configs/train_demo_vitkd.yaml --set optim.epochs=5\n"
                              "  torchrun --nproc_per_node 8 -m jobs.cli train jobs/configs/train_scalekd_swinl_resnet50.yaml\n"
                              "  kdcache train CONFIG --ray --set ray.num_workers=8 --set ray.use_gpu=true\n"
                              "  ray job submit --address http://HEAD:8265 -- kdcache train CONFIG --ray")
    t.add_argument("config", help="YAML config (sections cache, student, methods, method_options, data, optim)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    t.add_argument("--online-teacher", metavar="CHECKPOINT", default=None,
                   help="run the cache's teacher live from CHECKPOINT (must match the cache's weights) instead of "
                        "reading targets: for comparisons and equivalence checks; with data.mixup/data.cutmix on a "
                        "cache of unmixed views it mixes each batch as timm does, the teacher on the mixed batch")
    t.add_argument("--online-views", choices=["cached", "fresh"], default="cached",
                   help="with --online-teacher: the stored view records (default), or fresh views every epoch "
                        "(mixed as the cache's views.mix, if any)")
    t.add_argument("--ray", action="store_true",
                   help="train as DDP ranks on Ray Train workers (settings: the config's ray: section, e.g. --set "
                        "ray.num_workers=4 --set ray.use_gpu=true; a ray: section alone also turns it on); checkpoints "
                        "through Ray Train, restarts from the last one when a worker dies")
    t.add_argument("--address", default=None,
                   help="with --ray: the Ray cluster (default: RAY_ADDRESS, else a private local Ray)")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(fn=cmd_train)

    w = sub.add_parser("sweep", help="train many students from one cache at once, as Ray tasks",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run the trials of a sweep file (a base training config and a grid and/or list of "
                                   "overrides) concurrently on Ray, each a kdcache train run with its own resources (one "
                                   "GPU each where there are GPUs), all reading the same cache. A failed trial is "
                                   "reported without stopping the others; a rerun skips finished trials. Writes "
                                   "OUTPUT/results.json and results.png and prints the table.",
                       epilog="sweep file:\n  base: train.yaml\n  output: runs/sweep\n  grid: {student.model: "
                              "[resnet18, mobilenetv3_small_100], seed: [0, 1, 2]}\n  trials: [{methods: ce}, "
                              "{methods: ce+kd}]\n  resources: {CPU: 1}\n  max_retries: 1")
    w.add_argument("sweep", help="the sweep YAML")
    w.add_argument("--address", default=None, help="the Ray cluster (default: RAY_ADDRESS, else a private local Ray)")
    w.set_defaults(fn=cmd_sweep)

    e = sub.add_parser("eval", help="evaluate a trained student",
                       description="Top-1/top-5 with timm's centre-crop eval transform on validation tars.")
    e.add_argument("run", help="a training output folder (holds config.yaml and last.pt)")
    e.add_argument("--val-urls", default=None, help="validation tars (default: the run's data.val_urls)")
    e.add_argument("--ema", action="store_true", help="evaluate the EMA weights if the run kept them")
    e.add_argument("--batch-size", type=int, default=256)
    e.set_defaults(fn=cmd_eval)

    m = sub.add_parser("demo", help="the embedded default, end to end",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Write the digits shards, take the small ViT teacher shipped with the package "
                                   "(or train it: --train-teacher), cache it with the "
                                   "Ray job (local Ray, local files), then train the students of "
                                   "jobs/configs/demo_students.yaml from that cache without the teacher, each with "
                                   "KD and as a no-KD baseline on the same budget. Prints a table and writes "
                                   "results.json and results.png into --workdir. Reruns reuse finished steps.",
                       epilog="examples:\n  kdcache demo                  # 1 seed: 10 min on 2 idle cores\n"
                              "  kdcache demo --quick          # 3.5 min: shipped teacher, 2 views, 2-epoch students\n"
                              "  kdcache demo --seeds 0 1 2    # the README's KD-gain table (mean ± std of 3 seeds)\n"
                              "  kdcache demo --train-teacher  # train the teacher here too (6 min more)")
    m.add_argument("--workdir", default="./kdcache-demo", help="where everything goes (default ./kdcache-demo)")
    m.add_argument("--quick", action="store_true",
                   help="fewer epochs and views, for smoke tests; teacher, cache and results go to WORKDIR/quick")
    m.add_argument("--seeds", type=int, nargs="+", default=[0], help="student seeds; table = mean ± std over them (default 0)")
    m.add_argument("--no-students", action="store_true", help="stop after the cache (steps 1-3)")
    m.add_argument("--jobs", type=int, default=2,
                   help="student runs trained at once, each in its own process with an equal share of the CPU "
                        "threads (default 2; 1 = in turn, in this process)")
    m.add_argument("--force", action="store_true", help="redo everything: teacher, cache and students")
    m.add_argument("--train-teacher", action="store_true",
                   help="train the teacher here (the shipped one's recipe, jobs/assets/demo_teacher.json) instead of "
                        "using the weights shipped with the package")
    m.add_argument("--address", default=None, help="Ray address (default: private local instance)")
    m.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ray_was_up = ray_is_up()  # a caller's own Ray (main called in-process) is left as it is
    try:
        return args.fn(args)
    except Exception as e:  # one place that turns known failures into one clear line (jobs.failures)
        rc = exit_status(args.command, e, debug=args.debug, ray_was_up=ray_was_up)
        if rc is None:
            raise
        return rc


if __name__ == "__main__":  # python -m jobs.cli: as the kdcache command (main, then a quick exit)
    from jobs.console import main as console_main

    console_main()

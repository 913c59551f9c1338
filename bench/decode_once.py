"""The caching job's CPU data path per view at 224 px, on ImageNet-shaped synthetic JPEGs (issue 15 item 2).

    python -m bench.decode_once                    # 5 rounds, 64 images, 4 views (~3 min on 2 cores)
    python -m bench.decode_once --rounds 7 --images 128 --views 8

Two measurements, each in interleaved rounds (A B A B …; median and min–max over rounds), on one thread
(``torch.set_num_threads(1)``, so the figures are per core):

1. **Breakdown**: CPU time per view of each step, timed one by one on the same samples and views as the job runs
   them: read (the tar's members streamed), decode (JPEG → RGB), sampling the view record, crop/resize (+flip), RandAugment, normalise
   (to float, mean/std), erase; and on the write side, per view, target encoding (top-10 logits of 1,000
   classes + Swin-L's final tap, 49 × 1536 tokens in fp16, ScaleKD) and zstd at the cache's level of the encoded
   rows, in chunks of 64 rows. The teacher output is random (a real tap compresses somewhat better).
   Also "to uint8 tensor" (what normalising on the device instead would leave on the CPU).
   The steps' sum is checked against ``apply_view``'s own output (the same tensor, bit for bit).
2. **Views/s per core**, the host side of the data path end to end as the caching job runs it
   (:func:`pipeline.tars.iter_samples`, :func:`pipeline.views.sample_view`, :func:`pipeline.views.apply_view`,
   zstd of the encoded rows): each view decoding its tar again (before decode-once) against one decode for all
   ``--views`` views of the tar. The target encoding is left out: the job runs it where the teacher runs, on the
   device of a GPU node (its CPU cost, in the breakdown, is what a CPU-only job pays on top).

From views/s per core: cores per GPU to feed each teacher at its published rate (timm's inference benchmarks:
Swin-L 1,125 and ViT-L 1,108 img/s at 224 px, EVA02-L 123 img/s at 448 px — the latter's views cost more than
224 px ones, so its figure here is a lower bound). Writes ``bench/decode_once.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numcodecs
import numpy as np
import torch
import torchvision.transforms.functional as F
from fsspec.core import url_to_fs

from pipeline.images import decode_image
from pipeline.synthetic import write_synthetic
from pipeline.targets import encode_targets, to_numpy
from pipeline.tars import iter_samples, raw_groups
from pipeline.teacher import TeacherOutput
from pipeline.views import apply_view, crop_flip, erase, randaugment, sample_view
from storage_schemas.arrays import CODEC_ZSTD_LEVEL
from storage_schemas.codecs import LogitsInfo, codecs_of
from storage_schemas.taps import TapInfo
from storage_schemas.views import ViewRecipe

OUT = Path(__file__).resolve().parent / "decode_once.json"
SIZE = 224
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RECIPE = ViewRecipe.model_validate({"seed": 0, "randaugment": "rand-m9-mstd0.5-inc1", "erase": {"prob": 0.25}})
TEACHERS = {"swin_large_patch4_window7_224": 1125.0, "vit_large_patch16_224": 1108.0, "eva02_large_patch14_448": 123.0}
STEPS = ("read", "decode", "sample_record", "crop_resize", "randaugment", "normalise", "erase", "encode_targets", "zstd")


def codecs():
    logits = LogitsInfo(mode="topk", k=10, num_classes=1000, rest_logmass=True)
    tap = TapInfo(name="final", index=3, norm=True, tokens=49, dim=1536, grid=(7, 7), prefix_tokens=0, dtype="fp16")
    return codecs_of(logits, [tap])


def fake_output(n: int, seed: int) -> TeacherOutput:
    g = torch.Generator().manual_seed(seed)
    return TeacherOutput(logits=torch.randn(n, 1000, generator=g) * 3,
                         features={"final": torch.randn(n, 49, 1536, generator=g)})


def write_side(out: TeacherOutput, cs, zstd) -> tuple[float, float]:
    """Seconds of target encoding and of zstd over its rows (chunks of 64 rows), for ``out``'s batch."""
    t0 = time.perf_counter()
    rows = to_numpy(encode_targets(out, cs)[0])
    t1 = time.perf_counter()
    for r in rows.values():
        for lo in range(0, len(r), 64):
            zstd.encode(np.ascontiguousarray(r[lo:lo + 64]))
    return t1 - t0, time.perf_counter() - t1


def breakdown(url: str, views: int) -> dict[str, float]:
    """Seconds per view of each step, over every sample of the tar and ``views`` views (read and decode once a
    sample, divided by the views as decode-once does; the per-view path pays them ``views`` times)."""
    t = dict.fromkeys((*STEPS, "to_uint8"), 0.0)
    t0 = time.perf_counter()
    images = [group["jpg"] for _, _, group in raw_groups(url, *url_to_fs(url))]
    t["read"] = time.perf_counter() - t0
    n = 0
    for pos, data in enumerate(images):
        t0 = time.perf_counter()
        img = decode_image(data)
        t["decode"] += time.perf_counter() - t0
        for v in range(views):
            t0 = time.perf_counter()
            rec = sample_view(RECIPE, tar=0, position=pos, view=v, width=img.width, height=img.height)
            t["sample_record"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            x = crop_flip(img, rec, RECIPE, size=SIZE)
            t1 = time.perf_counter()
            x = randaugment(x, rec, RECIPE)
            t2 = time.perf_counter()
            u8 = F.pil_to_tensor(x)
            t3 = time.perf_counter()
            y = F.normalize(F.to_tensor(x), MEAN, STD)
            t4 = time.perf_counter()
            erase(y, rec, RECIPE)
            t5 = time.perf_counter()
            t["crop_resize"] += t1 - t0
            t["randaugment"] += t2 - t1
            t["to_uint8"] += t3 - t2
            t["normalise"] += t4 - t3
            t["erase"] += t5 - t4
            if pos == 0 and v == 0:  # the steps are apply_view's, bit for bit
                assert torch.equal(y, apply_view(img, rec, RECIPE, size=SIZE, mean=MEAN, std=STD)) and u8.dtype == torch.uint8
            n += 1
    cs, zstd = codecs(), numcodecs.Zstd(level=CODEC_ZSTD_LEVEL)
    for lo in range(0, n, 64):
        enc, z = write_side(fake_output(min(64, n - lo), lo), cs, zstd)
        t["encode_targets"] += enc
        t["zstd"] += z
    return {k: v / n for k, v in t.items()}


def data_path(url: str, views: int, decode_once: bool) -> float:
    """Views/s of the job's host-side data path over the tar: read, decode, sample + apply each view, zstd of the
    encoded rows. Not the target encoding: the job runs it where the teacher runs (on a GPU node, the device)."""
    zstd = numcodecs.Zstd(level=CODEC_ZSTD_LEVEL)
    encoded = to_numpy(encode_targets(fake_output(64, 0), codecs())[0])
    t0 = time.perf_counter()
    n = 0

    def view(s, v):
        rec = sample_view(RECIPE, tar=0, position=s.position, view=v, width=s.image.width, height=s.image.height)
        return apply_view(s.image, rec, RECIPE, size=SIZE, mean=MEAN, std=STD)

    def flush(xs: list) -> None:
        for r in encoded.values():
            zstd.encode(np.ascontiguousarray(r[:len(xs)]))
        xs.clear()

    if decode_once:
        pending: dict[int, list] = {v: [] for v in range(views)}
        for s in iter_samples(url):
            for v in range(views):
                pending[v].append(view(s, v))
                n += 1
                if len(pending[v]) == 64:
                    flush(pending[v])
        for xs in pending.values():
            if xs:
                flush(xs)
    else:
        for v in range(views):
            xs: list = []
            for s in iter_samples(url):
                xs.append(view(s, v))
                n += 1
                if len(xs) == 64:
                    flush(xs)
            if xs:
                flush(xs)
    return n / (time.perf_counter() - t0)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": values}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64, help="images in the synthetic tar (default 64)")
    p.add_argument("--views", type=int, default=4, help="views per image (default 4)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        res = write_synthetic(tmp, classes=1000, images=a.images, per_tar=a.images, seed=0)
        url = res["train"].replace("{000000..000000}", "000000")
        jpeg_kb = res["bytes"]["train"] / a.images / 1e3
        data_path(url, 1, True)  # warm-up: imports, first-call costs
        rounds: dict[str, list] = {"per_view": [], "once": []}
        steps: list[dict] = []
        for r in range(a.rounds):  # A B A B …, the order flipped every other round
            order = ("per_view", "once") if r % 2 == 0 else ("once", "per_view")
            for k in order:
                rounds[k].append(data_path(url, a.views, k == "once"))
            steps.append(breakdown(url, a.views))
    step_ms = {k: summary([1e3 * s[k] for s in steps]) for k in steps[0]}
    vps = {k: summary(v) for k, v in rounds.items()}
    ratio = summary([o / p_ for o, p_ in zip(rounds["once"], rounds["per_view"], strict=True)])
    cores = {k: {t: math.ceil(rate / vps[k]["median"]) for t, rate in TEACHERS.items()} for k in vps}
    result = {
        "machine": f"{cpu_name()} ({os.cpu_count()} cores), 1 thread used; load average before/after "
                   f"{load[0]:.1f}/{os.getloadavg()[0]:.1f} (other work on the machine)",
        "images": a.images, "views": a.views, "rounds": a.rounds, "size": SIZE, "jpeg_kb_mean": jpeg_kb,
        "recipe": "rand-m9-mstd0.5-inc1, erase prob 0.25, hflip 0.5, RandomResizedCrop (0.08, 1), bicubic",
        "write_side": "top-10 of 1,000 logits + Swin-L final tap 49x1536 fp16 (random values), zstd level "
                      f"{CODEC_ZSTD_LEVEL} in chunks of 64 rows",
        "step_ms_per_view": step_ms,
        "views_per_core_s": {"decode_per_view": vps["per_view"], "decode_once": vps["once"]},
        "decode_once_speedup": ratio,
        "cores_per_gpu": {"decode_per_view": cores["per_view"], "decode_once": cores["once"]},
    }
    a.out.write_text(json.dumps(result, indent=1))
    print(result["machine"])
    print(f"CPU per view at {SIZE} px, {a.images} synthetic ImageNet-shaped JPEGs ({jpeg_kb:.0f} KB mean), "
          f"{a.views} views, 1 thread, {a.rounds} interleaved rounds: median [min–max] ms")
    once = lambda k: k in ("read", "decode")  # noqa: E731 - paid once per image with decode-once
    for k, s in step_ms.items():
        note = f"   (x{a.views} = {s['median'] * a.views:.2f} ms per view without decode-once)" if once(k) else ""
        print(f"  {k:15s} {s['median']:7.2f} [{s['min']:.2f}–{s['max']:.2f}]{note}")
    for k, label in (("per_view", "decode per view"), ("once", "decode once")):
        s = vps[k]
        print(f"views/s per core, {label:16s} {s['median']:7.1f} [{s['min']:.1f}–{s['max']:.1f}]   cores per GPU: "
              + ", ".join(f"{t.split('_patch')[0]} {c}" for t, c in cores[k].items()))
    print(f"decode-once speed-up {ratio['median']:.2f} [{ratio['min']:.2f}–{ratio['max']:.2f}] (paired by round); "
          f"wrote {a.out}")
    return result


if __name__ == "__main__":
    main()

"""Does distilling from the cache help? Each student with and without KD, same budget, 3 seeds.

Runs on the demo cache (``kdcache demo`` first): the digits, a ViT teacher, 4 cached views.
Baseline = the same student, same views replayed from the same cache, same epochs and
optimiser, trained with cross-entropy only. Prints a table and writes ``bench/kd_gain.json``.

    python -m bench.kd_gain --workdir kdcache-demo --epochs 8 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from student.config import TrainConfig
from student.trainer import Trainer

from .common import device_name, markdown_table, write_results

VIT = {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 2, "num_classes": 10}
# (label, timm model, kwargs, input size, KD methods and options). The MLP student replays the
# cached views at 64 px: a student reads the view records at its own resolution.
STUDENTS = [
    ("ResNet-18 (CNN)", "vanilla KD", "resnet18", {"num_classes": 10}, 32, "ce+kd", {}),
    ("ResNet-18 (CNN)", "ScaleKD", "resnet18", {"num_classes": 10}, 32, "ce+kd+scalekd",
     {"ce": {"weight": 0.5}, "kd": {"weight": 0.5, "soft_ce": True}}),
    ("Mixer-S/16 @64px (MLP)", "ScaleKD", "mixer_s16_224", {"img_size": 64, "num_classes": 10}, 64,
     "ce+kd+scalekd", {"ce": {"weight": 0.5}, "kd": {"weight": 0.5, "soft_ce": True}}),
    ("ViT 4×64 (ViT)", "ViTKD", "vit_tiny_patch16_224", VIT, 32, "ce+vitkd", {}),
]


def train(workdir: Path, model: str, kwargs: dict, size: int, methods: str, options: dict, seed: int,
          epochs: int, out: Path) -> float:
    cfg = TrainConfig.model_validate({
        "cache": {"url": str(workdir / "cache.zarr")},
        "student": {"model": model, "model_kwargs": kwargs, "input_size": size, "mean": [0.5] * 3, "std": [0.5] * 3},
        "methods": methods, "method_options": options,
        "data": {"batch_size": 64, "val_urls": str(workdir / "data" / "val-{000000..000001}.tar"),
                 "eval_crop_pct": 1.0},
        "optim": {"opt": "adamw", "lr": 2e-3, "weight_decay": 0.05, "epochs": epochs, "warmup_epochs": 1},
        "seed": seed, "output": str(out), "log_every": 50,
    })
    return Trainer(cfg, progress=False).fit()["val_top1"]


def run(workdir: Path, epochs: int, seeds: list[int]) -> dict:
    rows, baselines = [], {}
    t0 = time.time()
    for label, method, model, kwargs, size, methods, options in STUDENTS:
        if label not in baselines:
            baselines[label] = [train(workdir, model, kwargs, size, "ce", {}, s, epochs,
                                      workdir / "runs" / f"kdgain-{model}-ce-s{s}") for s in seeds]
        kd = [train(workdir, model, kwargs, size, methods, options, s, epochs,
                    workdir / "runs" / f"kdgain-{model}-{methods}-s{s}") for s in seeds]
        base = baselines[label]
        rows.append({"student": label, "method": method, "methods": methods,
                     "baseline_top1": statistics.mean(base), "kd_top1": statistics.mean(kd),
                     "gain": statistics.mean(kd) - statistics.mean(base),
                     "baseline_per_seed": base, "kd_per_seed": kd, "seeds": seeds})
        print(rows[-1], flush=True)
    return {"device": device_name(), "epochs": epochs, "seeds": seeds, "rows": rows,
            "seconds": time.time() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="kdcache-demo", type=Path)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a = p.parse_args()
    res = run(a.workdir.resolve(), a.epochs, a.seeds)
    print(markdown_table(res["rows"], ["student", "method", "methods", "baseline_top1", "kd_top1", "gain"]))
    print(f"written {write_results('kd_gain', res)}")


if __name__ == "__main__":
    main()

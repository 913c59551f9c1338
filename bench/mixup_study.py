"""Mixed views from the cache against mixing with the teacher in the loop, on the digits (issue 14 item 7).

Three ways to train one student, same budget and seeds, all from the demo's teacher, data and view recipe:

- ``no_mix``: the demo cache (unmixed views), vanilla KD (``ce+kd``);
- ``cached_mix``: a cache of as many *mixed* views (``views.mix``: VanillaKD's A2 recipe, Mixup α 0.1, CutMix α 1.0,
  switch 0.5, every view mixed), the teacher's targets on each mixed image, labels mixed as timm's
  ``mixup_target`` — the teacher is not loaded;
- ``online_mix``: the teacher in the loop on fresh views every epoch, each batch mixed by timm's ``Mixup``
  (batch mode, the same α; :mod:`student.batch_mix`) — what VanillaKD's training script does, and the reference
  a cache of mixed views stands in for.
- ``online_view_mix`` (with ``--only``): the teacher in the loop on fresh *per-view* mixes every epoch, drawn from
  the mixed cache's recipe as the cache draws them (``--online-views fresh``): tells a cached mix's staleness (a
  sample meets the same few mixes every epoch) from the per-view pairing itself.
- ``cached_mix_per_epoch`` (with ``--only``): a mixed cache of as many views as epochs, so that no mix repeats (as
  ``jobs/configs/vanillakd_a2_beitv2b.yaml`` caches one view per epoch).

Student: the demo's MobileNetV3-S (a CNN, as VanillaKD's ResNet-50; its no-KD baseline leaves room under the
teacher), with vanilla KD as the demo trains it. Top-1 on the demo's validation tars, per seed.

    python -m bench.mixup_study --workdir kdcache-demo --seeds 0 1 2

Writes ``bench/mixup_study.json``, the key ``studies.mixup`` of ``bench/results.json``
(``{"no_mix": [top-1 per seed], "cached_mix": [...], "online_mix": [...]}``) and its section of ``bench/results.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from jobs.demo import demo_config, run_demo
from jobs.demo_students import load_students, merge_config, run_config, train_one
from pipeline.job import run_cache_job

from .common import OUT, device_name, markdown_table, update_report, write_results
from .kd_studies import study_cache

MIX = {"mixup_alpha": 0.1, "cutmix_alpha": 1.0, "prob": 1.0, "switch_prob": 0.5}  # VanillaKD A2 (README)
STUDENT = "MobileNetV3-S (CNN)"


def student_config(epochs: int) -> tuple[dict, int]:
    """The demo's run of :data:`STUDENT`, with vanilla KD; its epochs unless ``epochs`` is given."""
    spec = load_students()
    run = next(r for r in spec.runs if r.label == STUDENT)
    cfg = merge_config(merge_config(spec.common, run.config), {"methods": "ce+kd", "method_options": {}})
    return cfg, epochs or run.epochs["full"]


def conditions(wd: Path) -> dict[str, tuple[str, dict]]:
    """name → (cache kind, config overrides)."""
    fresh = {"online_teacher": {"checkpoint": str(wd / "teacher.safetensors"), "views": "fresh"}}
    online = {**fresh, "data": {"mixup": MIX["mixup_alpha"], "cutmix": MIX["cutmix_alpha"]}}
    return {"no_mix": ("plain", {}), "cached_mix": ("mixed", {}), "online_mix": ("plain", online),
            "online_view_mix": ("mixed", fresh), "cached_mix_per_epoch": ("mixed_per_epoch", {})}


def run(wd: Path, epochs: int, seeds: list[int], names: list[str]) -> dict:
    t0 = time.time()
    if not (wd / "teacher.json").exists():
        run_demo(str(wd), students=False)  # data, teacher and the demo cache
    demo = demo_config(wd, quick=False)  # the demo cache itself (a no-op when it is complete)
    caches = {"plain": (demo.output.url, run_cache_job(demo, progress=False, log=lambda s: None).teacher.weights_sha256),
              "mixed": study_cache(wd, "mixed4", [f"views.num_views={demo.views.num_views}",
                                                  f"views.mix={json.dumps(MIX)}"])}
    base, epochs = student_config(epochs)
    if "cached_mix_per_epoch" in names:  # one mixed view per sample and epoch, as the VanillaKD configs cache
        caches["mixed_per_epoch"] = study_cache(wd, f"mixed{epochs}", [f"views.num_views={epochs}",
                                                                      f"views.mix={json.dumps(MIX)}"])
    rows, top1 = [], {}
    for seed in seeds:  # seeds outermost: a partial run still compares the conditions on the same seeds
        for name in names:
            kind, extra = conditions(wd)[name]
            url, sha = caches[kind]
            cfg = run_config(merge_config(base, extra), cache_url=url, runs_dir=wd / "studies" / "runs",
                             val_urls=f"{wd}/data/val-{{000000..000001}}.tar", epochs=epochs, seed=seed,
                             teacher_sha256=sha)
            r = train_one(cfg, progress=False)
            top1.setdefault(name, []).append(r["top1"])
            print(f"  {name} seed {seed}: {r['top1']:.2f}% ({r['train_seconds'] or 0:.0f} s)", flush=True)
    for name in names:
        rows.append({"condition": name, "top1_mean": statistics.mean(top1[name]),
                     "top1_std": statistics.pstdev(top1[name]), "top1_per_seed": top1[name]})
    return {"device": device_name(), "student": f"{STUDENT}, ce+kd", "epochs": epochs, "seeds": seeds, "mix": MIX,
            "rows": rows, "mixup": top1, "seconds": time.time() - t0}


def merge_previous(res: dict, path: Path) -> dict:
    """``res`` with the conditions of the last run at ``path`` that this one did not run (same student, epochs,
    seeds and mix), so that ``--only`` adds a condition to the table instead of replacing it."""
    if not path.exists():
        return res
    old = json.loads(path.read_text())
    if any(old.get(k) != res[k] for k in ("student", "epochs", "seeds", "mix")):
        return res
    ran = {r["condition"] for r in res["rows"]}
    kept = [r for r in old["rows"] if r["condition"] not in ran]
    order = list(conditions(Path(".")))
    rows = sorted(kept + res["rows"], key=lambda r: order.index(r["condition"]))
    return {**res, "rows": rows, "mixup": {r["condition"]: r["top1_per_seed"] for r in rows},
            "seconds": res["seconds"] + old.get("seconds", 0.0)}


MD_BEGIN, MD_END = "<!-- mixup: begin (python -m bench.mixup_study) -->", "<!-- mixup: end -->"


def markdown(res: dict) -> str:
    """The study's section of ``bench/results.md``, between :data:`MD_BEGIN` and :data:`MD_END`."""
    return "\n".join([MD_BEGIN, f"## Mixed views: cached vs online ({res['student']}, {res['epochs']} epochs, seeds "
                                 f"{res['seeds']}, mix {res['mix']})",
                      markdown_table(res["rows"], ["condition", "top1_mean", "top1_std", "top1_per_seed"]), MD_END, ""])


def save(res: dict) -> Path:
    """``bench/mixup_study.json``; ``studies.mixup`` in ``bench/results.json`` and this study's section of
    ``bench/results.md`` (replaced, or added at the end; the rest of both kept)."""
    path = write_results("mixup_study", res)
    update_report(["studies", "mixup"], res["mixup"], markdown(res), MD_BEGIN, MD_END, OUT)
    return path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="kdcache-demo", type=Path, help="the demo's workdir (made if missing)")
    p.add_argument("--epochs", type=int, default=0, help="student epochs (default: the demo's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--only", nargs="+", choices=list(conditions(Path("."))),
                   default=["no_mix", "cached_mix", "online_mix"],
                   help="conditions to run (the others of the last run with the same settings are kept)")
    a = p.parse_args(argv)
    res = run(a.workdir.resolve(), a.epochs, a.seeds, a.only)
    res = merge_previous(res, OUT / "mixup_study.json")
    print(f"\nstudent top-1 ({res['student']}, {res['epochs']} epochs, seeds {res['seeds']}, mix {MIX})")
    print(markdown_table(res["rows"], ["condition", "top1_mean", "top1_std", "top1_per_seed"]))
    print(f"written {save(res)}, studies.mixup in {OUT / 'results.json'} and its section of {OUT / 'results.md'}")
    return res


if __name__ == "__main__":
    main()

"""``python -m bench``: every benchmark of the project, one report.

Writes ``bench/results.json`` (device, the headline ratios, bytes per view, and each
benchmark's full results) and ``bench/results.md`` (the tables), plus the PNG plots of the
views and codec studies; ``studies.mixup`` holds the mixed-views study (``bench.mixup_study``). Every ratio is measured in this run, on this device, in interleaved
rounds (``--rounds``), as its median over rounds with an interval, and each goal gets a
verdict: met, not met or undecided (see ``bench.common``).

    python -m bench                    # everything (estimated 100 min on 2 idle CPU cores: caching 35, studies 32, mixup 25)
    python -m bench --skip-studies     # caching and student speed only (estimated 40 min)
    python -m bench --report-only      # rebuild the report from the last JSON of each benchmark
    python -m bench --scale            # only the real-scale report of issue 15 (≤ 25 min on 2 idle cores; bench.scale)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import cache_throughput, kd_studies, mixup_study, scale, student_speed
from .common import OUT, RATIO_COLUMNS, device_name, markdown_table, ratio_rows, verdict_lines
from .scale import report as scale_report


def report(cache: dict, speed: dict, studies: dict | None, mixup: dict | None = None) -> tuple[dict, str]:
    cache_ratios = ("cache_job_vs_teacher_forward", "cache_job_end_to_end_vs_teacher_forward")
    ratios = {**{k: cache[k] for k in cache_ratios}, **speed["ratios"]}
    spreads = {**{k: cache["ratios_spread"][k] for k in cache_ratios}, **speed["ratios_spread"]}
    verdicts = cache["verdicts"] + speed["verdicts"]
    results = {"device": device_name(), "ratios": ratios, "ratios_spread": spreads, "verdicts": verdicts,
               "bytes_per_view": {r["codec"]: r["bytes_per_view"] for r in cache["bytes"]},
               "cache_throughput": cache, "student_speed": speed, "kd_studies": studies,
               "studies": {"mixup": mixup["mixup"]} if mixup else {}}
    # one row per ratio, a teacher's ratio as name[teacher]
    flat, flat_spreads = {}, {}
    for k, v in ratios.items():
        for sub, value in (v.items() if isinstance(v, dict) else [(None, v)]):
            name = f"{k}[{sub}]" if sub else k
            flat[name] = value
            if k in spreads:
                flat_spreads[name] = spreads[k][sub] if sub else spreads[k]
    md = [f"# kdcache benchmarks on {results['device']}", "",
          f"Medians over paired, interleaved rounds (caching: {cache['rounds']} rounds; student speed: "
          f"{speed['rounds']} rounds × {speed['steps']} steps in turns of {speed['slice']}, after {speed['warmup']} "
          "warm-up steps); spreads are "
          "min–max over rounds, a ratio's interval is that of `bench.common.median_interval` (min–max of the "
          "per-round ratios for 5–7 rounds).", "",
          "## Caching job vs teacher forward alone (views/s)",
          markdown_table(cache_throughput.table_rows(cache["throughput"]), cache_throughput.TABLE_COLUMNS),
          "", "## Bytes per view and fidelity, by codec",
          markdown_table(cache["bytes"], ["codec", "bytes_per_view", "logits_bytes_per_view",
                                          "feature:final_bytes_per_view", "feature:final_cosine"]),
          "", "## Cost growth (one axis at a time, one run)",
          markdown_table(cache["growth"], ["axis", "value", "bytes_total", "bytes_vs_base", "seconds_vs_base"]),
          "", f"## Student steps/s and peak memory ({speed['student']})",
          markdown_table(student_speed.table_rows(speed), student_speed.TABLE_COLUMNS),
          "", "## Ratios", markdown_table(ratio_rows(flat, flat_spreads, verdicts), RATIO_COLUMNS),
          "", "## Goals", *[f"- {line}" for line in verdict_lines(verdicts)]]
    if studies:
        md += ["", f"## Student accuracy vs cached views ({studies['student']}, {studies['epochs']} epochs, "
                   f"seeds {studies['seeds']})",
               markdown_table(studies["views"], ["views", "top1_mean", "top1_std"]),
               "", "## Student accuracy vs target codec (4 views)",
               markdown_table(studies["codecs"], ["codec", "bytes_per_view", "top1_mean", "top1_std"])]
    else:
        md += ["", "The accuracy studies were not part of this run (`python -m bench.kd_studies`)."]
    if mixup:
        md += ["", mixup_study.markdown(mixup)]
    return results, "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="kdcache-demo", type=Path, help="the demo's workdir (made if missing)")
    p.add_argument("--rounds", type=int, default=5,
                   help="interleaved rounds of the caching and student-speed benchmarks (see their --help)")
    p.add_argument("--skip-studies", action="store_true", help="skip the accuracy studies (views, codecs, mixed views)")
    p.add_argument("--epochs", type=int, default=12, help="student epochs in the studies")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the studies")
    p.add_argument("--report-only", action="store_true",
                   help="rerun nothing: rebuild results.json/.md from each benchmark's last JSON in bench/")
    p.add_argument("--scale", action="store_true",
                   help="run only bench.scale (issue 15's real-scale figures), with bench.scale's options: writes "
                        "the key 'scale' of results.json and its section of results.md, keeping the rest")
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--scale" in argv:  # every other option is bench.scale's (python -m bench.scale --help)
        scale.main([x for x in argv if x != "--scale"])
        return
    a = p.parse_args(argv)
    if a.report_only:
        def last(name: str) -> dict | None:
            f = OUT / f"{name}.json"
            return json.loads(f.read_text()) if f.exists() else None

        cache, speed, studies = last("cache_throughput"), last("student_speed"), last("kd_studies")
        mixup = last("mixup_study")
        if cache is None or speed is None:
            raise SystemExit("--report-only: run python -m bench.cache_throughput and bench.student_speed first")
        if "ratios_spread" not in cache or "ratios_spread" not in speed:
            raise SystemExit("--report-only: the JSON in bench/ predates measuring in rounds; rerun "
                             "python -m bench.cache_throughput and bench.student_speed")
    else:
        cache = cache_throughput.main(["--rounds", str(a.rounds)])
        speed = student_speed.main(["--workdir", str(a.workdir), "--rounds", str(a.rounds)])
        studies = None if a.skip_studies else kd_studies.main(
            ["--workdir", str(a.workdir), "--epochs", str(a.epochs), "--seeds", *map(str, a.seeds)])
        mixup = None if a.skip_studies else mixup_study.main(
            ["--workdir", str(a.workdir), "--seeds", *map(str, a.seeds)])
    results, md = report(cache, speed, studies, mixup)
    last_scale = OUT / "scale.json"
    if last_scale.exists():  # the last `--scale` run's figures stay in the report
        res = json.loads(last_scale.read_text())
        results["scale"] = res["scale"]
        md = scale_report.with_section(md, scale_report.markdown(res))
    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    (OUT / "results.md").write_text(md)
    print("\n" + md)
    print(f"written {OUT / 'results.json'} and {OUT / 'results.md'}")


if __name__ == "__main__":
    main()

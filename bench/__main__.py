"""``python -m bench``: every benchmark of the project, one report.

Writes ``bench/results.json`` (device, the headline ratios, bytes per view, and each
benchmark's full results) and ``bench/results.md`` (the tables), plus the PNG plots of the
views and codec studies. Every ratio is measured in this run, on this device.

    python -m bench                    # everything (~45 min on 2 CPU cores, most of it the studies)
    python -m bench --skip-studies     # caching and student speed only (~12 min)
    python -m bench --report-only      # rebuild the report from the last JSON of each benchmark
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import cache_throughput, kd_studies, student_speed
from .common import OUT, device_name, markdown_table


def report(cache: dict, speed: dict, studies: dict | None) -> tuple[dict, str]:
    ratios = {
        "cache_job_vs_teacher_forward": cache["cache_job_vs_teacher_forward"],
        "cache_job_end_to_end_vs_teacher_forward": cache["cache_job_end_to_end_vs_teacher_forward"],
        **speed["ratios"],
    }
    results = {"device": device_name(), "ratios": ratios,
               "bytes_per_view": {r["codec"]: r["bytes_per_view"] for r in cache["bytes"]},
               "cache_throughput": cache, "student_speed": speed, "kd_studies": studies}
    md = [f"# kdcache benchmarks on {results['device']}", "",
          "## Caching job vs teacher forward alone (views/s)",
          markdown_table(cache["throughput"], ["teacher", "forward_only_views_per_s", "ray_job_views_per_s",
                                               "ray_job_in_units_vs_forward", "ray_job_vs_forward"]),
          "", "## Bytes per view and fidelity, by codec",
          markdown_table(cache["bytes"], ["codec", "bytes_per_view", "logits_bytes_per_view",
                                          "feature:final_bytes_per_view", "feature:final_cosine"]),
          "", "## Cost growth (one axis at a time)",
          markdown_table(cache["growth"], ["axis", "value", "bytes_total", "bytes_vs_base", "seconds_vs_base"]),
          "", f"## Student steps/s and peak memory ({speed['student']})",
          markdown_table(speed["rows"], ["config", "steps_per_s", "peak_memory_mb"]),
          "", "## Ratios", markdown_table([{"ratio": k, "value": v} for k, v in ratios.items()
                                           if not isinstance(v, dict)], ["ratio", "value"])]
    if studies:
        md += ["", f"## Student accuracy vs cached views ({studies['student']}, {studies['epochs']} epochs, "
                   f"seeds {studies['seeds']})",
               markdown_table(studies["views"], ["views", "top1_mean", "top1_std"]),
               "", "## Student accuracy vs target codec (4 views)",
               markdown_table(studies["codecs"], ["codec", "bytes_per_view", "top1_mean", "top1_std"])]
    return results, "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="kdcache-demo", type=Path, help="the demo's workdir (made if missing)")
    p.add_argument("--skip-studies", action="store_true", help="skip the views/codec accuracy studies")
    p.add_argument("--epochs", type=int, default=12, help="student epochs in the studies")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the studies")
    p.add_argument("--report-only", action="store_true",
                   help="rerun nothing: rebuild results.json/.md from each benchmark's last JSON in bench/")
    a = p.parse_args(argv)
    if a.report_only:
        def last(name: str) -> dict | None:
            f = OUT / f"{name}.json"
            return json.loads(f.read_text()) if f.exists() else None

        cache, speed, studies = last("cache_throughput"), last("student_speed"), last("kd_studies")
        if cache is None or speed is None:
            raise SystemExit("--report-only: run python -m bench.cache_throughput and bench.student_speed first")
    else:
        cache = cache_throughput.main([])
        speed = student_speed.main(["--workdir", str(a.workdir)])
        studies = None if a.skip_studies else kd_studies.main(
            ["--workdir", str(a.workdir), "--epochs", str(a.epochs), "--seeds", *map(str, a.seeds)])
    results, md = report(cache, speed, studies)
    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    (OUT / "results.md").write_text(md)
    print("\n" + md)
    print(f"written {OUT / 'results.json'} and {OUT / 'results.md'}")


if __name__ == "__main__":
    main()

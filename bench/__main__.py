"""``python -m bench``: run every benchmark, write ``bench/results.json``."""

from __future__ import annotations

import json

from . import cache_throughput
from .common import OUT, device_name


def main() -> None:
    cache = cache_throughput.main()
    results = {
        "device": device_name(),
        "ratios": {"cache_job_vs_teacher_forward": cache["cache_job_vs_teacher_forward"],
                   "cache_job_end_to_end_vs_teacher_forward": cache["cache_job_end_to_end_vs_teacher_forward"]},
        "bytes_per_view": {r["codec"]: r["bytes_per_view"] for r in cache["bytes"]},
        "cache_throughput": cache,
    }
    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    print(f"written {OUT / 'results.json'}")


if __name__ == "__main__":
    main()

"""The report of :mod:`bench.scale`: the ``scale`` key of ``bench/results.json`` (:func:`headline`) and the
"Real scale" section of ``bench/results.md`` (:func:`markdown`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from student.stream import WHOLE_UNIT_BYTES

from .. import decode_once
from ..common import (
    OUT,
    RATIO_COLUMNS,
    judge,
    markdown_table,
    ratio_rows,
    update_report,
    verdict_lines,
    with_spread,
)
from ..common import with_section as common_with_section
from .caches import reader_chunk_rows
from .spec import GOALS, MD_BEGIN, MD_END


def headline(data_path: dict | None, jobs: dict | None, read: dict | None, nbytes: dict | None) -> dict:
    """The ``scale`` key of ``bench/results.json``: the figures the issue names (medians), their spreads and the
    goals' verdicts beside them. A part that did not run gives ``None`` / empty figures."""
    jobs = jobs or {}
    ratios = (read or {}).get("ratios", {})
    local, s3 = ratios.get("local", {}), ratios.get("s3", {})
    cpu = (read or {}).get("cpu_ratios", {})
    res = {
        "data_path_views_per_core_s": {k: v["median"] for k, v in data_path["views_per_core_s"].items()}
        if data_path else None,
        "cores_per_gpu": data_path["cores_per_gpu"]["decode_once"] if data_path else None,
        "job_vs_forward": {m: j["job_vs_forward"]["median"] for m, j in jobs.items()},
        "job_end_to_end_vs_forward": {m: j["job_end_to_end_vs_forward"]["median"] for m, j in jobs.items()},
        "reader_vs_images_only": {k: v["median"] for k, v in local.items()},
        "reader_vs_images_only_s3": {k: v["median"] for k, v in s3.items()},
        # samples per worker CPU-second, vs images only: the reader's cost, which the machine's load hardly moves
        "reader_cpu_vs_images_only": {k: v["median"] for k, v in cpu.get("local", {}).items()},
        "reader_cpu_vs_images_only_s3": {k: v["median"] for k, v in cpu.get("s3", {}).items()},
        "bytes_per_view": nbytes["per_view"] if nbytes else {},
        "tpp_pack_bytes": nbytes["tpp_pack_bytes"] if nbytes else {},
    }
    res["spreads"] = {
        "data_path_views_per_core_s": data_path["views_per_core_s"] if data_path else None,
        "cores_per_gpu_decode_per_view": data_path["cores_per_gpu"]["decode_per_view"] if data_path else None,
        "job_vs_forward": {m: j["job_vs_forward"] for m, j in jobs.items()},
        "job_end_to_end_vs_forward": {m: j["job_end_to_end_vs_forward"] for m, j in jobs.items()},
        "reader_vs_images_only": local, "reader_vs_images_only_s3": s3,
        "reader_cpu_vs_images_only": cpu.get("local", {}), "reader_cpu_vs_images_only_s3": cpu.get("s3", {}),
    }
    verdicts = [judge(f"job_vs_forward[{m}]", jobs[m]["job_vs_forward"], target,
                      f"caching job in steady state ≥ {target} × the teacher's forward alone, {m} @ 224 px")
                for m, target in GOALS["job_vs_forward"] if m in jobs]
    for src, rs in ratios.items():
        key = "reader_vs_images_only" + ("_s3" if src == "s3" else "")
        verdicts += [judge(f"{key}[{name}]", rs[name], target,
                           f"student reader with {name} ≥ {target} × images only ({src})")
                     for name, target in GOALS["reader"]]
    res["verdicts"] = verdicts
    return res


def markdown(res: dict) -> str:
    """The "Real scale" section of ``bench/results.md`` (the parts that ran)."""
    h, d = res["scale"], res
    lines = [MD_BEGIN, f"## Real scale (issue 15) on {d['machine']}", "",
             f"`python -m bench --scale` (parts: {', '.join(d['parts'])}), {d['finished']}, {d['minutes']:.1f} min"
             + (f" (parts measured at: {', '.join(f'{k} {v}' for k, v in d['parts_finished'].items())})"
                if len(set(d.get("parts_finished", {}).values())) > 1 else "") + "; "
             f"load average before/after {d['load'][0]:.1f}/{d['load'][1]:.1f}"
             f"{' (a loaded machine: other work ran beside it)' if d['loaded'] else ''}. Synthetic ImageNet-shaped "
             f"JPEGs ({d['data']['jpeg_kb_mean']:.0f} KB mean), random-init teachers, 224 px. Medians; spreads are "
             "min–max over rounds, a ratio's interval is `bench.common.median_interval`'s (min–max of the per-round "
             "ratios for up to 7 rounds; fewer than 5 rounds cannot decide a goal).", ""]
    if d["data_path"]:
        dp = d["data_path"]
        lines += ["### Data path per core (item 2) and cores per GPU", "",
                  f"`bench.decode_once` ({dp['images']} images × {dp['views']} views, {dp['rounds']} rounds, one "
                  "thread): host-side views/s per core, and the cores that feed each teacher at its published rate.",
                  "", markdown_table(_data_path_rows(dp), DATA_PATH_COLUMNS), ""]
    if d["caching"]:
        lines += ["### Caching job vs teacher forward alone (item 3)", "",
                  f"{d['data']['images']} images in tars of {d['data']['per_tar']}, one view, the first tar the "
                  "actor's warm-up; steady state = views/s inside the other units; end to end = all views over the "
                  "job's whole time; fixed = the job's time outside units. The actor's CPUs and the forward's "
                  f"threads: {', '.join(sorted({str(j.get('threads', '?')) for j in d['caching'].values()}))} "
                  f"(`--job-threads`) of {os.cpu_count()} cores.", "",
                  markdown_table([_job_row(j) for j in d["caching"].values()], JOB_COLUMNS), ""]
    if d["reader"]:
        rd = d["reader"]
        lines += ["### Student reader at real size (item 4)", "",
                  f"Caches of {d['data']['reader_images']} images in tars of {d['data']['reader_per_tar']} (Zarr chunks of "
                  f"{reader_chunk_rows(d['data']['reader_per_tar'])} rows; a unit over {WHOLE_UNIT_BYTES >> 20} MiB is read a "
                  "chunk of rows at a time, straight into each sample's own buffer, as an ImageNet tar's taps are); "
                  f"{rd['workers']} DataLoader workers, batch {rd['batch_size']}, {rd['samples_per_epoch']} samples "
                  f"an epoch; {rd['rounds']} rounds × {rd['epochs']} epochs per configuration in slices of "
                  f"{rd['slice_epochs']} (a DataLoader each). Samples/s after each DataLoader's first batch (the "
                  "steady state an ImageNet epoch is made of; the first batch's wait is its own column; worker CPU "
                  "is the workers' own CPU time per sample in that steady state, which other work on the machine "
                  "hardly moves), up to the "
                  "batches the loader hands out, each copied out of the worker's reused shared-memory slot "
                  "(`student.ring`) as the loader copies it to the training device; decoding the targets to fp32 "
                  "is the device's work in the step (its cost on this CPU in the last column). The targets' CPU "
                  "cost on top of the images, measured apart in one process: reading a tar's rows as a worker does "
                  "(read, checksums; Zarr's zstd and copies for compressed taps) and handing a batch over (stack into a reused slot, copy out), beside "
                  "the DataLoader's usual way (stack into a fresh shared segment, whose pages the kernel allocates "
                  "and zeroes on first touch). The caches' rows come from a synthetic forward "
                  "with the real teachers' shapes and per-channel statistics (`bench.scale.caches.synthetic_forward`); "
                  "the S3 server (moto, reading a ranged GET's range alone: `bench/scale/moto_server.py`) runs on this machine's cores too. "
                  "Ceiling here: the most \"vs images only\" can be on this machine for a reader of this design, images "
                  "alone's CPU a sample (workers, main process, S3 server) over that plus the least the rows add (a read "
                  "with checksums, or a loopback receive and the server's send; two copies), each pass timed alone "
                  "(`bench/scale/ceiling.py`).", "",
                  markdown_table([_reader_row(r) for r in rd["rows"]], READER_COLUMNS), ""]
    if h["bytes_per_view"]:
        lines += ["### Bytes per view at real shapes", "",
                  markdown_table([{"target": k, "bytes_per_view": v} for k, v in h["bytes_per_view"].items()] +
                                 [{"target": f"TPP pack (once per cache) {k}", "bytes_per_view": v}
                                  for k, v in h["tpp_pack_bytes"].items()], ["target", "bytes_per_view"]), ""]
    lines += ["### Ratios and goals", "", markdown_table(ratio_rows(*_flat(h)), RATIO_COLUMNS), "",
              *[f"- {line}" for line in verdict_lines(h["verdicts"])], MD_END]
    return "\n".join(lines) + "\n"


DATA_PATH_COLUMNS = ["data path", "views/s per core", *[f"cores/GPU {t}" for t in decode_once.TEACHERS]]


def _data_path_rows(dp: dict) -> list[dict]:
    return [{"data path": k, "views/s per core": with_spread(v["median"], v["min"], v["max"]),
             **{f"cores/GPU {t}": n for t, n in dp["cores_per_gpu"][k].items()}}
            for k, v in dp["views_per_core_s"].items()]


JOB_COLUMNS = ["teacher", "views (steady/all)", "rounds", "forward alone views/s", "job steady views/s",
               "job end-to-end views/s", "steady / forward", "end-to-end / forward", "job fixed s"]
READER_COLUMNS = ["source", "targets", "samples/s", "vs images only", "ceiling here", "worker CPU ms/sample", "main-process CPU ms/sample",
                  "samples per CPU s vs images only", "target KB/sample (stored)",
                  "cache MB/s (stored)", "cache MB/s (decoded)", "first batch s", "S3 server CPU ms/sample",
                  "read rows ms/sample", "hand-over (ring) ms/sample", "hand-over (fresh shared memory) ms/sample",
                  "fp32 decode on CPU ms/sample"]


def _job_row(j: dict) -> dict:
    v = j["views_per_s"]
    return {"teacher": j["teacher"], "views (steady/all)": f"{j['views_steady']}/{j['views_total']}",
            "rounds": j["rounds"],
            "forward alone views/s": with_spread(v["forward"]["median"], v["forward"]["min"], v["forward"]["max"]),
            "job steady views/s": with_spread(v["steady"]["median"], v["steady"]["min"], v["steady"]["max"]),
            "job end-to-end views/s": with_spread(v["end_to_end"]["median"], v["end_to_end"]["min"],
                                                  v["end_to_end"]["max"]),
            "steady / forward": with_spread(j["job_vs_forward"]["median"], *j["job_vs_forward"]["interval"]),
            "end-to-end / forward": with_spread(j["job_end_to_end_vs_forward"]["median"],
                                                *j["job_end_to_end_vs_forward"]["interval"]),
            "job fixed s": j["job_fixed_seconds"]}


def _reader_row(r: dict) -> dict:
    sp, vs, cm, cv = r["samples_per_s"], r["vs_images_only"], r["worker_cpu_ms_per_sample"], r["cpu_vs_images_only"]
    mm = r.get("main_cpu_ms_per_sample")  # runs before 2026-12-02 have none
    return {"source": r["source"], "targets": r["targets"],
            "samples/s": with_spread(sp["median"], sp["min"], sp["max"]),
            "vs images only": with_spread(vs["median"], *vs["interval"]) if vs else "1",
            "ceiling here": r["ceiling"]["ceiling"] if r.get("ceiling") else None,  # runs before 2026-12-02 17:00: none
            "worker CPU ms/sample": with_spread(cm["median"], cm["min"], cm["max"]),
            "main-process CPU ms/sample": with_spread(mm["median"], mm["min"], mm["max"]) if mm else None,
            "samples per CPU s vs images only": with_spread(cv["median"], *cv["interval"]) if cv else "1",
            "target KB/sample (stored)": r["stored_bytes_per_sample"] / 1e3,
            "cache MB/s (stored)": r["cache_mb_per_s_stored"], "cache MB/s (decoded)": r["cache_mb_per_s_decoded"],
            "first batch s": r["first_batch_s"], "S3 server CPU ms/sample": r["server_cpu_ms_per_sample"],
            "fp32 decode on CPU ms/sample": r["decode_ms_per_sample"],
            "read rows ms/sample": (r["breakdown_ms_per_sample"] or {}).get("read_rows"),
            "hand-over (ring) ms/sample": (r["breakdown_ms_per_sample"] or {}).get("hand_over"),
            "hand-over (fresh shared memory) ms/sample": (r["breakdown_ms_per_sample"] or {}).get("fresh_shared_memory")}


def _flat(h: dict) -> tuple[dict, dict, list]:
    ratios, spreads = {}, {}
    for key in ("job_vs_forward", "job_end_to_end_vs_forward", "reader_vs_images_only", "reader_vs_images_only_s3",
                "reader_cpu_vs_images_only", "reader_cpu_vs_images_only_s3"):
        for sub, v in h.get(key, {}).items():
            ratios[f"{key}[{sub}]"] = v
            spreads[f"{key}[{sub}]"] = h["spreads"][key][sub]
    return ratios, spreads, h["verdicts"]


def with_section(md: str, section: str) -> str:
    """``md`` with its scale section (between :data:`MD_BEGIN` and :data:`MD_END`) replaced by ``section``, or
    ``section`` appended when it has none."""
    return common_with_section(md, section, MD_BEGIN, MD_END)


def write_report(res: dict, out: Path = OUT) -> None:
    """``bench/scale.json``, the ``scale`` key of ``bench/results.json`` (its other keys kept) and the scale
    section of ``bench/results.md``."""
    (out / "scale.json").write_text(json.dumps(res, indent=1))
    update_report(["scale"], res["scale"], markdown(res), MD_BEGIN, MD_END, out)

"""The pure pieces of bench/scale/: configs, the report's assembly, the markdown section, relocation of a cache's
tars, and the stored-bytes recomputation against what the job stored."""

from __future__ import annotations

import pytest

from bench import scale
from bench.common import ratio_summary, spread
from bench.scale import caches, caching, nbytes, reader, report, spec
from storage_schemas.codecs import tap_codec


def test_scale_configs_cache_what_the_methods_need():
    swin = caching.scale_config(spec.SWIN, spec.TEACHERS[spec.SWIN], "/d/train-{000000..000001}.tar", "/c.zarr",
                              batch_size=6, chunk_rows=6)
    vit = caching.scale_config(spec.VIT, spec.TEACHERS[spec.VIT], "/d/train-{000000..000001}.tar", "/c.zarr",
                             batch_size=6, chunk_rows=6)
    assert [(t.name, t.index, t.norm) for t in swin.targets.features] == [("final", -1, True)]
    assert [(t.name, t.index, t.norm) for t in vit.targets.features] == [
        ("block0", 0, False), ("block1", 1, False), ("final", -1, True)]
    for cfg in (swin, vit):
        assert cfg.targets.tpp is not None and cfg.targets.logits.k == 10 and cfg.targets.feature_dtype == "fp16"
        assert cfg.teacher.checkpoint is None and not cfg.teacher.pretrained  # random init
        assert cfg.teacher.input_size == 224 and cfg.views.num_views == 1 and cfg.job.chunk_rows == 6


def test_reader_configurations_name_the_caches_they_read():
    assert {"images_only", "logits_top10", "scalekd_swinl_final", "vitkd_3taps"} <= set(spec.READER)
    assert spec.READER["images_only"][1:] == (False, ())
    assert {name for name, _ in spec.GOALS["reader"]} <= set(spec.READER)
    assert {key for key, _, _ in spec.READER.values()} == set(spec.READER_CACHES)
    # the goals are judged on the default storage: fp16 taps, the schema's default chain (without zstd since 1.8)
    for name, _ in spec.GOALS["reader"]:
        assert spec.READER_CACHES[spec.READER[name][0]][1:] == ("fp16", None)
    # the ViT-L variants differ from the default only in how the taps are stored
    variants = {spec.READER_CACHES[spec.READER[n][0]][1:] for n in spec.READER if n.startswith("vitkd_3taps")}
    assert variants == {("fp16", None), ("fp16", "zstd"), ("int8", None)}
    urls = "/d/t-{000000..000001}.tar"
    default = caching.scale_config(spec.VIT, spec.TEACHERS[spec.VIT], urls, "/c.zarr", batch_size=6, chunk_rows=6)
    zstd = caching.scale_config(spec.VIT, spec.TEACHERS[spec.VIT], urls, "/c.zarr", batch_size=6, chunk_rows=6,
                              feature_compression="zstd")
    assert (default.output.feature_compression, zstd.output.feature_compression) == ("none", "zstd")


def test_with_section_replaces_the_scale_section_or_appends_it():
    section = f"{spec.MD_BEGIN}\nnew\n{spec.MD_END}\n"
    assert report.with_section("# bench\n\ntext\n", section) == f"# bench\n\ntext\n\n{section}"
    old = f"# bench\n\n{spec.MD_BEGIN}\nold\n{spec.MD_END}\n\n## after\n"
    assert report.with_section(old, section) == f"# bench\n\n{spec.MD_BEGIN}\nnew\n{spec.MD_END}\n\n## after\n"
    assert report.with_section("", section).strip() == section.strip()


class _Counting:
    """A stand-in dataset: epoch e yields (e, 0), (e, 1)."""

    def __init__(self) -> None:
        self.epoch = None

    def set_epoch(self, e: int) -> None:
        self.epoch = e

    def __iter__(self):
        return iter([(self.epoch, 0), (self.epoch, 1)])


def test_epochs_reads_consecutive_epochs_in_one_iteration():
    assert list(reader.Epochs(_Counting(), 3, first=2)) == [(2, 0), (2, 1), (3, 0), (3, 1), (4, 0), (4, 1)]


def _fake_parts():
    rounds = [1.0, 1.1, 0.9, 1.0, 1.05]
    data_path = {"views_per_core_s": {"decode_per_view": spread([20.0, 21, 19, 20, 20]),
                                      "decode_once": spread([60.0, 61, 59, 60, 60])},
                 "cores_per_gpu": {"decode_per_view": {spec.SWIN: 57, spec.VIT: 56, "eva02_large_patch14_448": 7},
                                   "decode_once": {spec.SWIN: 19, spec.VIT: 19, "eva02_large_patch14_448": 3}},
                 "images": 32, "views": 4, "rounds": 5}
    job = {"teacher": spec.SWIN, "views_steady": 18, "views_total": 24, "rounds": 5,
           "views_per_s": {k: spread(rounds) for k in ("forward", "steady", "end_to_end")},
           "job_vs_forward": ratio_summary([0.97, 0.98, 0.99, 0.96, 0.98], [1.0] * 5),
           "job_end_to_end_vs_forward": ratio_summary([0.2] * 5, [1.0] * 5), "job_fixed_seconds": 60.0}
    ratios = {"logits_top10": ratio_summary([0.99] * 5, [1.0] * 5),
              "scalekd_swinl_final": ratio_summary([0.97, 0.96, 0.98, 0.99, 0.97], [1.0] * 5),
              "vitkd_3taps": ratio_summary([0.85, 0.86, 0.95, 0.87, 0.88], [1.0] * 5)}
    read = {"ratios": {"local": ratios}, "rows": [], "workers": 2, "batch_size": 16, "samples_per_epoch": 48,
            "rounds": 5, "epochs": 4, "slice_epochs": 2}
    nbytes = {"per_view": {"scalekd_swinl_final_fp16": 138279.9}, "tpp_pack_bytes": {spec.SWIN: 245632609}}
    return data_path, {spec.SWIN: job}, read, nbytes


def test_headline_has_the_issue_keys_and_judges_the_goals():
    data_path, jobs, read, nbytes = _fake_parts()
    h = report.headline(data_path, jobs, read, nbytes)
    assert h["data_path_views_per_core_s"] == {"decode_per_view": 20.0, "decode_once": 60.0}
    assert h["cores_per_gpu"] == {spec.SWIN: 19, spec.VIT: 19, "eva02_large_patch14_448": 3}
    assert h["job_vs_forward"][spec.SWIN] == pytest.approx(0.98)
    assert set(h["reader_vs_images_only"]) == {"logits_top10", "scalekd_swinl_final", "vitkd_3taps"}
    assert h["reader_vs_images_only_s3"] == {}
    verdicts = {v["ratio"]: v["verdict"] for v in h["verdicts"]}
    assert verdicts == {f"job_vs_forward[{spec.SWIN}]": "met",  # interval 0.96–0.99 ≥ 0.95
                        "reader_vs_images_only[scalekd_swinl_final]": "met",
                        "reader_vs_images_only[vitkd_3taps]": "undecided"}  # 0.85–0.95 straddles 0.90


def test_headline_and_markdown_of_a_partial_run():
    h = report.headline(None, None, None, None)
    assert h["data_path_views_per_core_s"] is None and h["job_vs_forward"] == {} and h["verdicts"] == []
    res = {"scale": h, "machine": "cpu", "parts": ["caching"], "finished": "now", "minutes": 1.0, "load": [0.1, 0.2],
           "loaded": False, "data": {"jpeg_kb_mean": 110.0}, "data_path": None, "caching": None, "reader": None}
    md = report.markdown(res)
    assert md.startswith(spec.MD_BEGIN) and md.rstrip().endswith(spec.MD_END) and "Caching job" not in md


def test_markdown_of_a_full_run_has_every_table():
    data_path, jobs, read, nbytes = _fake_parts()
    res = {"scale": report.headline(data_path, jobs, read, nbytes), "machine": "cpu", "parts": list(scale.PARTS),
           "finished": "now", "minutes": 20.0, "load": [2.0, 2.5], "loaded": True,
           "data": {"jpeg_kb_mean": 110.0, "images": 24, "per_tar": 6, "reader_images": 48, "reader_per_tar": 24},
           "data_path": data_path, "caching": jobs, "reader": read}
    md = report.markdown(res)
    for title in ("Data path per core", "Caching job vs teacher forward alone", "Student reader at real size",
                  "Bytes per view", "Ratios and goals", "loaded machine"):
        assert title in md, title
    assert "| decode_once | 60 (59–61) | 19 | 19 | 3 |" in md


def test_relocated_points_the_manifest_at_the_new_tars(small_cache):
    from pipeline.store import CacheStore
    from pipeline.tars import dataset_fingerprint, index_tar

    m = CacheStore(str(small_cache["path"]), read_only=True).read_manifest()
    urls = {s.url: f"s3://bkt/data/{i}.tar" for i, s in enumerate(m.dataset.shards)}
    r = reader.relocated(m, urls)
    assert [s.url for s in r.dataset.shards] == list(urls.values())
    assert [(s.size, s.count) for s in r.dataset.shards] == [(s.size, s.count) for s in m.dataset.shards]
    assert r.arrays == m.arrays and r.features == m.features and r.stats == m.stats
    # the fingerprint is the job's formula over the new URLs (checked on the original against the tars themselves)
    assert m.dataset.fingerprint == dataset_fingerprint([index_tar(s.url) for s in m.dataset.shards])
    assert r.dataset.fingerprint != m.dataset.fingerprint and len(r.dataset.fingerprint) == 64


def test_tap_bytes_recomputed_as_fp16_equal_what_the_job_stored(small_cache):
    from pipeline.store import CacheStore

    url = str(small_cache["path"])
    m = CacheStore(url, read_only=True).read_manifest()
    stored = m.summary()["targets"]
    tap = m.features[-1]
    zstd = m.compressed(tap_codec(tap).names[0])
    assert tap.dtype == "fp16" and not zstd  # the default chain since schema 1.8
    as_stored = nbytes.tap_bytes_per_view(url, tap.name, "fp16", compress=zstd)
    assert as_stored == pytest.approx(stored[tap.target]["bytes_per_view"], rel=1e-9)
    assert 0 < nbytes.tap_bytes_per_view(url, tap.name, "int8", compress=zstd) < as_stored
    assert 0 < nbytes.tap_bytes_per_view(url, tap.name, "fp16", compress=True) < as_stored


def test_synthetic_forward_answers_the_real_shapes_after_one_real_call():
    import torch

    from pipeline.teacher import Teacher
    from storage_schemas.config import TeacherConfig
    from storage_schemas.taps import TapSpec

    cfg = TeacherConfig(model="vit_tiny_patch16_224", model_kwargs={
        "img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 10})
    taps = [TapSpec(name="block0", index=0), TapSpec(name="final", index=-1, norm=True)]
    x = torch.randn(5, 3, 32, 32)
    real = Teacher(cfg, taps, tail_input_index=1)(x)
    calls = []
    with caches.synthetic_forward(seed=0):
        t = Teacher(cfg, taps, tail_input_index=1)
        inner = t.model.forward_intermediates
        t.model.forward_intermediates = lambda *a, **k: calls.append(1) or inner(*a, **k)
        outs = [t(x) for _ in range(3)]
    assert len(calls) == 1  # the first call's first rows only
    for out in outs:
        assert out.logits.shape == real.logits.shape and out.tail_input.shape == real.tail_input.shape
        assert {k: v.shape for k, v in out.features.items()} == {k: v.shape for k, v in real.features.items()}
    assert not torch.equal(outs[1].features["final"], outs[2].features["final"])  # drawn anew each call
    # per channel about the real output's moments (drawn from the first two rows' mean and std)
    ref = real.features["final"][:2].reshape(-1, 32)
    drawn = torch.cat([o.features["final"] for o in outs]).reshape(-1, 32)
    assert torch.allclose(drawn.mean(0), ref.mean(0), atol=0.5 * float(ref.std(0).max()))
    assert Teacher.__call__ is not None and "synthetic" not in Teacher.__call__.__qualname__  # restored


def test_steady_rate_starts_after_every_worker_made_a_batch():
    # two workers: batches made at 1.0 and 1.5 (each worker's first), then every 0.5 s
    produced = [(1.0, 16), (1.5, 16), (2.0, 16), (2.5, 16), (3.0, 8)]
    assert reader.steady_rate(produced, 2) == (40, 1.5)  # the batches after 1.5 s, over 1.5 → 3.0
    assert reader.steady_rate(list(reversed(produced)), 2) == (40, 1.5)  # arrival order does not matter
    assert reader.steady_rate(produced, 0) == (56, 2.0)  # in-process loading: after the first batch
    assert reader.steady_rate([(1.0, 16)], 2) == (0, 0.0)


def test_steady_cpu_counts_each_worker_after_its_first_batch():
    stamps = [(0, 1.0, 16), (1, 0.5, 16), (0, 1.2, 16), (1, 0.9, 16), (0, 1.4, 8)]
    assert reader.steady_cpu(stamps) == (40, pytest.approx(0.8))  # worker 0: 0.4 s for 24, worker 1: 0.4 s for 16


def test_a_partial_rerun_keeps_the_other_parts_of_the_last_run():
    data_path, jobs, read, nbytes = _fake_parts()
    last = {"parts": list(scale.PARTS), "finished": "t0", "data_path": data_path, "caching": jobs, "bytes": nbytes,
            "reader": read, "data": {"images": 18, "reader_images": 192, "reader_per_tar": 32}}
    new_jobs = {spec.VIT: {**jobs[spec.SWIN], "teacher": spec.VIT}}
    res = {"parts": ["caching"], "finished": "t1", "data_path": None, "caching": new_jobs, "bytes": nbytes,
           "reader": None, "data": {"images": 18, "reader_images": None, "reader_per_tar": 32}}
    out = scale.merged(res, last)
    assert out["caching"] is new_jobs and out["data_path"] is data_path and out["reader"] is read
    assert out["parts"] == list(scale.PARTS) and out["data"]["reader_images"] == 192
    assert out["parts_finished"] == {"caching": "t1", "data_path": "t0", "reader": "t0"}
    assert set(out["scale"]["job_vs_forward"]) == {spec.VIT}
    assert set(out["scale"]["reader_vs_images_only"]) == {"logits_top10", "scalekd_swinl_final", "vitkd_3taps"}
    assert scale.merged(res, None) is res


def test_a_partial_rerun_without_a_last_run_is_refused_before_any_work(monkeypatch, tmp_path, capsys):
    """`--parts reader` on a clone without bench/scale.json (not in git) would write a report of the reader alone
    over the committed one: refused in one line naming the file and what to run, before anything is measured."""
    monkeypatch.setattr(scale, "OUT", tmp_path)
    monkeypatch.setattr(scale, "run", lambda *a, **k: pytest.fail("measured before refusing"))
    with pytest.raises(SystemExit) as e:
        scale.main(["--parts", "reader", "--workdir", str(tmp_path / "w")])
    msg = str(e.value)
    assert str(tmp_path / "scale.json") in msg and "python -m bench --scale" in msg
    assert not (tmp_path / "results.md").exists() and not (tmp_path / "w").exists()


def test_a_reader_too_small_for_a_steady_state_is_refused_before_any_work(monkeypatch, tmp_path):
    """A worker needs two batches an epoch for the reader's steady state (its batches after its first): fewer
    (2 tars of 16 for 2 workers, batch 16) is refused in one line naming the options, before anything runs."""
    monkeypatch.setattr(scale, "OUT", tmp_path)
    monkeypatch.setattr(scale, "run", lambda *a, **k: pytest.fail("measured before refusing"))
    with pytest.raises(SystemExit) as e:
        scale.main(["--reader-tars", "2", "--reader-per-tar", "16", "--workdir", str(tmp_path / "w")])
    assert "--reader-tars 2 of --reader-per-tar 16" in str(e.value) and "16 samples an epoch" in str(e.value)
    assert not (tmp_path / "w").exists()
    with pytest.raises(SystemExit, match="under two batches"):  # 3 tars: still one a worker
        scale.main(["--reader-tars", "3", "--reader-per-tar", "31", "--reader-batch", "16"])

    class Ran(Exception):
        pass

    def run(*a, **k):
        raise Ran

    monkeypatch.setattr(scale, "run", run)
    with pytest.raises(Ran):  # the defaults pass the check
        scale.main(["--workdir", str(tmp_path / "w")])


def test_the_reader_s3_server_answers_each_range_with_its_bytes_as_s3_does():
    """:mod:`bench.scale.moto_server` reads a ranged GET's range alone: the bytes and headers S3 defines for
    each form of range (RFC 9110: first-last, first-, the last n; a range past the end clamped, one starting past
    it refused), checked against the object sliced here; a GET without a range is whole."""
    import boto3
    import botocore.exceptions
    import numpy as np

    from pipeline import s3_reads

    obj = np.random.default_rng(0).bytes(1_000_003)
    n = len(obj)
    s3 = reader.MotoS3()
    try:
        c = boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1", aws_access_key_id="testing",
                         aws_secret_access_key="testing-secret-0xKDC")
        c.put_object(Bucket=s3.bucket, Key="o", Body=obj)
        for spec_, first, last in [("0-9", 0, 9), ("10-", 10, n - 1), ("-7", n - 7, n - 1), ("999990-2000000", 999990, n - 1),
                                   ("5-5", 5, 5), ("-2000000", 0, n - 1)]:
            got = c.get_object(Bucket=s3.bucket, Key="o", Range=f"bytes={spec_}")
            assert got["ResponseMetadata"]["HTTPStatusCode"] == 206, spec_
            assert got["ContentRange"] == f"bytes {first}-{last}/{n}", spec_
            assert got["Body"].read() == obj[first:last + 1], spec_
        with pytest.raises(botocore.exceptions.ClientError, match="InvalidRange"):
            c.get_object(Bucket=s3.bucket, Key="o", Range=f"bytes={n}-")
        assert c.get_object(Bucket=s3.bucket, Key="o")["Body"].read() == obj
        store = s3_reads.store_for(*s3_reads.s3_config(f"s3://{s3.bucket}", s3.options))  # the reader's own client
        assert s3_reads.get(store, "o", 1000, 501_000, name="o").tobytes() == obj[1000:501_000]
        assert s3_reads.get(store, "o", -20, None, name="o").tobytes() == obj[-20:]
    finally:
        s3.close()


def test_goals_alone_are_judged_against_images_alone_by_round():
    """bench.scale.goals: each goal's ratio is paired by round with images alone; every round at or above the goal
    is met, every round under it not met, and the median is the middle round's ratio (worked by hand)."""
    from bench.scale.goals import goals

    rates = {"images_only": [100.0, 200.0, 100.0, 400.0, 100.0],
             "scalekd_swinl_final": [96.0, 192.0, 99.0, 380.0, 97.0],  # 0.96 0.96 0.99 0.95 0.97
             "vitkd_3taps": [80.0, 170.0, 85.0, 300.0, 89.0]}  # 0.80 0.85 0.85 0.75 0.89
    c, d = goals(rates, "local")
    assert c["ratio"] == "reader_vs_images_only[scalekd_swinl_final]" and c["target"] == 0.95
    assert c["median"] == pytest.approx(0.96) and c["verdict"] == "met" and c["rounds"] == 5
    assert d["target"] == 0.90 and d["median"] == pytest.approx(0.85) and d["verdict"] == "not met"
    assert d["goal"] == "student reader with vitkd_3taps ≥ 0.9 × images only (local)"


def test_ceiling_of_a_goal_is_the_images_cpu_over_it_plus_the_rows_least_passes():
    """bench.scale.ceiling: a sample's rows cost at least one read (local: from the page cache with its checksum;
    S3: a socket's receive with its checksum plus the server's send) and two copies (into the ring slot, out of
    it); a CPU-bound reader's ratio is at most images ÷ (images + that). Worked by hand."""
    from bench.scale.ceiling import ceiling, ceilings, least_ms

    ns = {"read_crc": 0.2, "copy": 0.1, "recv_crc": 0.3, "sendfile": 0.25}
    assert least_ms(1e6, 1e6, ns, "local") == pytest.approx(0.4)  # 1 MB × (0.2 + 2 × 0.1) ns
    assert least_ms(1e6, 1e6, ns, "s3") == pytest.approx(0.75)  # 1 MB × (0.3 + 0.25 + 2 × 0.1) ns
    assert least_ms(5e5, 1e6, ns, "local") == pytest.approx(0.3)  # compressed: 0.5 MB read, 1 MB copied twice
    with pytest.raises(ValueError, match="'local' or 's3'"):
        least_ms(1e6, 1e6, ns, "gcs")
    assert ceiling(4.0, 1.0) == pytest.approx(0.8)
    got = ceilings(3.6, {"vitkd_3taps": (1e6, 1e6), "scalekd_swinl_final": (2e5, 2e5)}, ns, "local")
    assert got["vitkd_3taps"]["ceiling"] == pytest.approx(0.9)  # 3.6 / (3.6 + 0.4)
    assert got["scalekd_swinl_final"]["least_extra_ms"] == pytest.approx(0.08)
    assert got["scalekd_swinl_final"]["ceiling"] == pytest.approx(3.6 / 3.68)


def test_ceiling_passes_move_the_bytes_they_time(tmp_path):
    """The passes are timed over real bytes: each costs some CPU, and the loopback transfer refuses a block whose
    checksum is not the file's (a transfer that moved nothing cannot pass for a fast one)."""
    import google_crc32c
    import numpy as np

    from bench.scale import ceiling

    got = ceiling.passes(1 << 20, rounds=1)
    assert set(got) == set(ceiling.PASSES) and all(v > 0 for v in got.values())
    data = np.arange(1 << 16, dtype=np.uint32).view(np.uint8)
    (tmp_path / "b.bin").write_bytes(data.tobytes())
    buf = np.empty(len(data), np.uint8)
    with open(tmp_path / "b.bin", "rb", buffering=0) as f:
        sent, received = ceiling._loopback(f, buf, google_crc32c.value(data))
        assert (buf == data).all() and sent >= 0 and received >= 0
        with pytest.raises(RuntimeError, match="received block's crc32c"):
            ceiling._loopback(f, buf, google_crc32c.value(data) ^ 1)


def test_reader_rows_show_their_ceiling_and_runs_before_it_show_none():
    sp = spread([300.0, 310.0, 320.0])
    row = {"source": "local", "targets": "vitkd_3taps", "samples_per_s": sp,
           "vs_images_only": ratio_summary([0.9] * 5, [1.0] * 5), "worker_cpu_ms_per_sample": sp,
           "main_cpu_ms_per_sample": sp, "cpu_vs_images_only": None, "stored_bytes_per_sample": 1.2e6,
           "cache_mb_per_s_stored": 1.0, "cache_mb_per_s_decoded": 1.0, "first_batch_s": 1.0,
           "server_cpu_ms_per_sample": None, "decode_ms_per_sample": None, "breakdown_ms_per_sample": None,
           "ceiling": {"ceiling": 0.909}}
    assert report._reader_row(row)["ceiling here"] == 0.909
    assert "ceiling here" in report.READER_COLUMNS
    del row["ceiling"]
    assert report._reader_row(row)["ceiling here"] is None

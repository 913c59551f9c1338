"""bench.reader_memory compares like with like: both ways stream the same samples of one cache, only the
blocks way reads the taps a chunk at a time, and its ratios are the per-round quotients of what it recorded."""

from __future__ import annotations

import numpy as np

from bench import reader_memory


def test_both_ways_stream_the_same_samples_and_only_blocks_read_by_chunk(tmp_path):
    url = reader_memory.build(tmp_path, model="vit_tiny_patch16_224", tars=2, per_tar=40, chunk_rows=8)
    assert reader_memory.build(tmp_path, model="vit_tiny_patch16_224", tars=2, per_tar=40, chunk_rows=8) == url
    res = reader_memory.run(url, rounds=2, shuffle_buffer=16, whole_unit_mb=0.01)
    runs = res["runs"]
    assert [r["samples"] for w in reader_memory.WAYS for r in runs[w]] == [80] * 4
    assert {r["largest_read_rows"] for r in runs["whole_units"]} == {40}  # a whole tar's unit at once
    assert {r["largest_read_rows"] for r in runs["blocks"]} == {8}  # one Zarr chunk of rows
    for w in reader_memory.WAYS:
        assert all(r["peak_rss_mb"] >= r["base_rss_mb"] > 0 for r in runs[w])
    held = {w: [r["held_mb"] for r in runs[w]] for w in reader_memory.WAYS}
    want = [b / a for a, b in zip(held["whole_units"], held["blocks"], strict=True)]
    assert np.allclose(res["held_blocks_vs_whole"]["per_round"], want)
    assert [row["reading"] for row in res["rows"]] == list(reader_memory.WAYS)

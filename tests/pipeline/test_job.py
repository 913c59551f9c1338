"""The caching job end to end: real Ray, real Zarr, real S3 protocol (moto on 127.0.0.1).

The reference for every target is the live teacher loaded with timm directly, fed the
view replayed from the stored record — not the job's own code path.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file

from jobs.cli import main as cli
from pipeline.job import run_cache_job
from pipeline.store import CacheStore
from pipeline.tars import iter_samples
from pipeline.tpp import load_input_stats, load_pack
from pipeline.verify import verify_cache
from pipeline.views import apply_view
from storage_schemas import arrays as A
from storage_schemas import layout
from storage_schemas.config import CacheConfig
from tests.conftest import cache_config

pytestmark = pytest.mark.ray


def data_files(root: Path) -> dict[str, bytes]:
    """Every stored object except the manifest, completion records (they hold timings) and the
    checksums of those (checksums.json, the manifest's sidecar)."""
    out = {}
    timed = {layout.MANIFEST, layout.MANIFEST_SHA256, layout.CHECKSUMS}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in timed and not rel.startswith(layout.UNITS_DIR):
            out[rel] = p.read_bytes()
    return out


def live_teacher(teacher: dict) -> torch.nn.Module:
    model = timm.create_model(teacher["model"], **teacher["model_kwargs"])
    model.load_state_dict(load_file(teacher["checkpoint"]))
    return model.eval()


def test_cache_matches_live_teacher(reference, tiny_teacher):
    m, cfg = reference["manifest"], reference["cfg"]
    assert m.status == "complete" and m.units_complete == m.units_total == len(m.dataset.shards) * 2
    store = CacheStore(str(reference["path"]), read_only=True)
    model = live_teacher(tiny_teacher)
    rng = np.random.default_rng(0)
    checked = 0
    for shard in range(len(m.dataset.shards)):
        samples = list(iter_samples(m.dataset.shards[shard].url))
        for view in range(m.num_views):
            rows = store.read_unit(m, shard, view)
            for pos in rng.choice(len(samples), 3, replace=False):
                s = samples[pos]
                assert rows[A.VALID][pos] == 1 and rows[A.LABEL][pos] == s.label
                rec = A.decode_view(rows, pos)
                x = apply_view(s.image, rec, cfg.views, size=32, mean=(0.5,) * 3, std=(0.5,) * 3)[None]
                with torch.no_grad():
                    final, inters = model.forward_intermediates(x, indices=[0], output_fmt="NLC")
                    logits = model.forward_head(final)[0]
                block0 = inters[0][0]  # patch tokens, cls dropped
                final_tokens = final[0, model.num_prefix_tokens:]
                np.testing.assert_allclose(rows["feat_block0"][pos], block0.numpy(), atol=2e-2, rtol=1e-2)
                np.testing.assert_allclose(rows["feat_final"][pos], final_tokens.numpy(), atol=2e-2,
                                           rtol=1e-2)
                # top-k: same classes, and exp(value - lse) is the live softmax on them
                probs = logits.softmax(-1).numpy()
                idx = rows["logits_topk_indices"][pos]
                assert set(idx) == set(np.argsort(-probs)[:5])
                rebuilt = np.exp(rows["logits_topk_values"][pos].astype(np.float64) - rows["logits_logsumexp"][pos])
                np.testing.assert_allclose(rebuilt, probs[idx], atol=2e-3)
                assert rows[A.PRED_TOP1][pos] == probs.argmax()
                checked += 1
    assert checked == 3 * len(m.dataset.shards) * m.num_views
    s = m.summary()
    assert s["targets"]["feature:final"]["fidelity"]["cosine_min"] > 0.999
    assert s["num_samples"] == sum(sh.count for sh in m.dataset.shards) and s["bytes_total"] > 0


def test_tpp_pack_reproduces_final_features(reference, tiny_teacher):
    store = CacheStore(str(reference["path"]), read_only=True)
    tail = load_pack(store)
    model = live_teacher(tiny_teacher)
    x = torch.randn(2, 3, 32, 32)
    idx = reference["manifest"].tpp.spec.input_index
    with torch.no_grad():
        final, inters = model.forward_intermediates(x, indices=[idx], output_fmt="NLC", return_prefix_tokens=True)
        spatial, prefix = inters[0]
        out = tail(torch.cat([prefix, spatial], 1))
    torch.testing.assert_close(out, final, atol=1e-5, rtol=1e-5)


def test_tail_input_stats_are_the_live_teachers_over_every_cached_view(reference, tiny_teacher):
    """Per-channel mean/std of the tail's input (patch tokens, cls dropped) over every cached
    view, recomputed from the views replayed through the live teacher."""
    m, cfg = reference["manifest"], reference["cfg"]
    store = CacheStore(str(reference["path"]), read_only=True)
    model = live_teacher(tiny_teacher)
    tokens = []
    for shard in range(len(m.dataset.shards)):
        samples = list(iter_samples(m.dataset.shards[shard].url))
        for view in range(m.num_views):
            rows = store.read_unit(m, shard, view)
            x = torch.stack([apply_view(s.image, A.decode_view(rows, pos), cfg.views, size=32, mean=(0.5,) * 3,
                                        std=(0.5,) * 3) for pos, s in enumerate(samples) if rows[A.VALID][pos]])
            with torch.no_grad():
                _, inters = model.forward_intermediates(x, indices=[m.tpp.spec.input_index], output_fmt="NLC")
            tokens.append(inters[0].flatten(0, 1).double())
    tokens = torch.cat(tokens)
    stats = load_input_stats(store)
    assert stats.count == tokens.shape[0] == m.stats.num_valid_rows * 16
    torch.testing.assert_close(stats.mean, tokens.mean(0).float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(stats.std, tokens.std(0, correction=0).float(), atol=1e-5, rtol=1e-4)


# ``kdcache cache`` with ``import torch`` refused in its own process (Ray's workers are other processes)
DRIVER_WITHOUT_TORCH = ("import sys; sys.modules['torch'] = None; sys.argv[0] = 'kdcache'; "
                        "from jobs.console import main; main()")


def test_rerun_is_byte_identical_and_resume_is_a_no_op(reference, digits, tiny_teacher, tmp_path):
    """Run again, through the CLI in a process that cannot import torch (the job's driver never needs it: the
    teacher runs on Ray workers, the TPP tail comes back as bytes; torch, timm and torchvision would cost it ~7 s of
    CPU at every start), the job writes the reference's bytes; run once more, it has nothing to do."""
    out = tmp_path / "again.zarr"
    cfg = CacheConfig.model_validate(cache_config(digits, tiny_teacher, str(out)))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cache_config(digits, tiny_teacher, str(out))))
    r = subprocess.run([sys.executable, "-c", DRIVER_WITHOUT_TORCH, "cache", str(tmp_path / "c.yaml"), "--no-progress"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_ADDRESS": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = data_files(reference["path"]), data_files(out)
    assert a.keys() == b.keys() and len(a) > 20
    assert [k for k in a if a[k] != b[k]] == []
    before = (out / layout.MANIFEST).read_bytes()
    run_cache_job(cfg, progress=False, log=lambda s: None)  # complete: nothing to do
    assert (out / layout.MANIFEST).read_bytes() == before


def test_in_process_build_is_byte_identical(reference, tmp_path):
    """The in-process build (``build_cache_in_process``: ``small_cache``, the Ray-free tests' cache) writes
    what the Ray job writes."""
    from pipeline.job import build_cache_in_process

    out = tmp_path / "in_process.zarr"
    cfg = reference["cfg"].model_copy(update={"output": reference["cfg"].output.model_copy(update={"url": str(out)})})
    small = build_cache_in_process(cfg, log=lambda s: None)
    a, b = data_files(reference["path"]), data_files(out)
    assert a.keys() == b.keys() and len(a) > 20
    assert [k for k in a if a[k] != b[k]] == []
    ref = reference["manifest"]
    timing = {"seconds", "samples_per_second"}
    assert small.identity == ref.identity and small.status == "complete"
    assert small.stats.model_dump(exclude=timing) == ref.stats.model_dump(exclude=timing)


def test_changed_config_is_refused_on_resume(reference, digits, tiny_teacher):
    cfg = CacheConfig.model_validate(cache_config(digits, tiny_teacher, str(reference["path"]), views__seed=7))
    with pytest.raises(ValueError, match=r"different views \(other than num_views\)"):
        run_cache_job(cfg, progress=False)


def _actor_pids() -> list[int]:
    """The caching job's actor processes started from this pytest process (or its xdist worker): Ray's processes
    inherit the environment of whoever started Ray, so those of the other xdist worker's Ray tests are told
    apart by ``PYTEST_XDIST_WORKER`` (``make test`` runs two streams of Ray tests side by side)."""
    var = b"PYTEST_XDIST_WORKER="
    mine = var + os.environ.get("PYTEST_XDIST_WORKER", "").encode()
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().decode(errors="ignore")
                if "UnitActor" not in cmd:
                    continue
                env = (d / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if next((e for e in env if e.startswith(var)), var) == mine:  # unset counts as empty on both sides
                pids.append(int(d.name))
    return pids


def test_worker_killed_mid_job_is_retried(reference, digits, tiny_teacher, tmp_path):
    """kill -9 the actor process while units run: Ray restarts it, the cache ends identical."""
    out = tmp_path / "killed.zarr"
    cfg = CacheConfig.model_validate(cache_config(digits, tiny_teacher, str(out)))
    result: dict = {}
    t = threading.Thread(target=lambda: result.setdefault("m", run_cache_job(cfg, progress=False)))
    t.start()
    killed = 0
    deadline = time.time() + 120
    store = CacheStore(str(out))
    while t.is_alive() and time.time() < deadline and killed < 2:
        done = len(store.completed_units()) if (out / layout.UNITS_DIR).exists() else 0
        pids = _actor_pids()
        if pids and done >= 1 + 2 * killed:
            os.kill(pids[0], signal.SIGKILL)
            killed += 1
        time.sleep(0.2)
    t.join(timeout=300)
    assert killed >= 1, "never saw an actor process to kill"
    assert result["m"].status == "complete"
    a, b = data_files(reference["path"]), data_files(out)
    assert [k for k in a if a.get(k) != b.get(k)] == [] and a.keys() == b.keys()


@pytest.mark.s3
def test_s3_cache_reads_back_identically(reference, digits, tiny_teacher, moto_s3, capsys):
    url = f"s3://{moto_s3['bucket']}/caches/digits.zarr"
    cfg = CacheConfig.model_validate(cache_config(digits, tiny_teacher, url))
    cfg.output.storage_options = moto_s3["storage_options"]
    m = run_cache_job(cfg, progress=False)
    s3 = CacheStore(url, moto_s3["storage_options"], read_only=True)
    local = CacheStore(str(reference["path"]), read_only=True)
    m3 = s3.read_manifest()
    assert m3.teacher == m.teacher == reference["manifest"].teacher
    assert moto_s3["storage_options"]["secret"] not in s3.read_bytes(layout.MANIFEST).decode()
    for shard in range(len(m.dataset.shards)):
        for view in range(m.num_views):
            a, b = s3.read_unit(m3, shard, view), local.read_unit(reference["manifest"], shard, view)
            for name in a:
                np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    tail = load_pack(s3)
    assert sum(p.numel() for p in tail.parameters()) == m.tpp.num_params
    # the lease was taken and released on S3; the checksum chain holds there too
    assert not s3.exists(layout.LEASE) and verify_cache(s3, progress=False).ok
    # credentials reach no stored object and no line of `kdcache inspect`
    secret = moto_s3["storage_options"]["secret"].encode()
    assert all(secret not in s3.read_bytes(rel) for rel in s3.objects())
    opts = moto_s3["storage_options"]
    args = ["inspect", url, "--json", "--storage-option", f"key={opts['key']}", "--storage-option",
            f"secret={opts['secret']}", "--storage-option", f"client_kwargs={json.dumps(opts['client_kwargs'])}"]
    assert cli(args) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["status"] == "complete" and opts["secret"] not in out.out + out.err

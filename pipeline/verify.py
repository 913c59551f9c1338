"""``kdcache verify``: is every byte of a cache what its job wrote, and does it agree with the teacher?

The integrity chain (schema ≥ 1.1) covers every object in the store:
``manifest.json.sha256`` → ``manifest.json`` → (its ``checksums_sha256``) ``checksums.json`` →
every object that is not an array shard (Zarr metadata, unit records, index, TPP pack) →
(each unit record's ``array_sha256``) every array shard object. On top of the hashes:

- every chunk decodes (zstd + crc32c in the codec chain), per array and unit;
- the records match the manifest: one per (tar, view), the tar's URL and sample count, valid =
  count − skipped, the rows flagged valid, labels within the classes, stats that add up;
- with ``teacher``: N cached views are replayed at the teacher's input from their stored
  records (a mixed view mixed with its partner's, as the job did) and pushed through the live teacher; its outputs, put through the cache's own codec,
  must match the stored rows.

Problems are collected, not raised: one run lists every damaged object, each by its path.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from storage_schemas import arrays as A
from storage_schemas import layout
from storage_schemas.arrays import decode_view
from storage_schemas.errors import CacheMismatchError
from storage_schemas.manifest import Manifest, UnitCompletion

from .store import CacheStore


@dataclass
class VerifyReport:
    url: str
    checked: dict[str, int] = field(default_factory=dict)  # what was checked, how many
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def count(self, what: str, n: int = 1) -> None:
        self.checked[what] = self.checked.get(what, 0) + n

    def as_dict(self) -> dict:
        return {"url": self.url, "ok": self.ok, "checked": self.checked, "problems": self.problems}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verify_cache(store: CacheStore, *, teacher_checkpoint: str | None = None, samples: int = 64,
                 input_storage_options: dict | None = None, progress: bool = True) -> VerifyReport:
    """Check ``store`` (open it read-only); see the module docstring for what is checked."""
    rep = VerifyReport(store.url)
    m = _manifest(store, rep)
    if m is None:
        return rep
    _checksums(store, m, rep)
    done = _completions(store, m, rep)
    _arrays(store, m, done, rep, progress)
    if teacher_checkpoint and not rep.problems:
        _teacher(store, m, teacher_checkpoint, samples, rep, input_storage_options)
    elif teacher_checkpoint:
        rep.problems.append("teacher comparison skipped: fix the problems above first")
    return rep


def _manifest(store: CacheStore, rep: VerifyReport) -> Manifest | None:
    if not store.exists(layout.MANIFEST):
        rep.problems.append(f"{layout.MANIFEST}: missing (not a cache, or its job never started)")
        return None
    data = store.read_bytes(layout.MANIFEST)
    if store.exists(layout.MANIFEST_SHA256):
        want = store.read_bytes(layout.MANIFEST_SHA256).decode(errors="replace").strip()
        if want != _sha(data):
            rep.problems.append(f"{layout.MANIFEST}: sha256 {_sha(data)[:12]}… does not match "
                                f"{layout.MANIFEST_SHA256} ({want[:12]}…): the manifest or its sidecar is damaged")
    else:
        rep.problems.append(f"{layout.MANIFEST_SHA256}: missing (cache written before schema 1.1, or damaged)")
    rep.count("manifest")
    try:
        m = Manifest.parse(data.decode(), where=store.url)
    except Exception as e:  # noqa: BLE001 - any parse failure is a finding, reported with its message
        rep.problems.append(f"{layout.MANIFEST}: does not parse: {e}")
        return None
    if m.status != "complete":
        rep.problems.append(f"{layout.MANIFEST}: status {m.status!r} ({m.units_complete}/{m.units_total} units); "
                            "finish the cache by rerunning its job")
    if store.exists(layout.GROWTH):
        try:
            g = json.loads(store.read_bytes(layout.GROWTH))
            what = (f"views {g['views'][0]} → {g['views'][1]}, {len(g['shards_added'])} new tar(s), by {g['user']} "
                    f"at {g['time']}")
        except (ValueError, KeyError, TypeError):
            what = "unreadable record"
        rep.problems.append(f"{layout.GROWTH}: a growth ({what}) is under way or was interrupted; the previous "
                            "extent stays readable, but the store can only be verified once the growth ends: rerun "
                            "the kdcache cache job that grows it")
        return None
    return m


def _checksums(store: CacheStore, m: Manifest, rep: VerifyReport) -> None:
    if m.checksums_sha256 is None:
        if m.status == "complete":
            rep.problems.append(f"{layout.MANIFEST}: no checksums_sha256 (cache written before schema 1.1); "
                                "only array shards can be checked")
        return
    if not store.exists(layout.CHECKSUMS):
        rep.problems.append(f"{layout.CHECKSUMS}: missing")
        return
    data = store.read_bytes(layout.CHECKSUMS)
    if _sha(data) != m.checksums_sha256:
        rep.problems.append(f"{layout.CHECKSUMS}: sha256 does not match the manifest's checksums_sha256")
        return
    sums: dict[str, str] = json.loads(data)
    present = set(store.checksummed_objects())
    for rel in sorted(set(sums) - present):
        rep.problems.append(f"{rel}: listed in {layout.CHECKSUMS} but missing from the store")
    for rel in sorted(present - set(sums)):
        rep.problems.append(f"{rel}: in the store but not in {layout.CHECKSUMS} (written after the job finished?)")
    for rel in sorted(present & set(sums)):
        if _sha(store.read_bytes(rel)) != sums[rel]:
            rep.problems.append(f"{rel}: sha256 does not match {layout.CHECKSUMS}")
        rep.count("objects hashed")


def _completions(store: CacheStore, m: Manifest, rep: VerifyReport) -> dict[tuple[int, int], UnitCompletion]:
    done: dict[tuple[int, int], UnitCompletion] = {}
    for s, v in sorted(store.completed_units()):
        rel = layout.unit_record_path(s, v)
        try:
            rec = UnitCompletion.model_validate_json(store.read_bytes(rel))
        except Exception as e:  # noqa: BLE001 - reported per record
            rep.problems.append(f"{rel}: does not parse: {str(e).splitlines()[0]}")
            continue
        if (rec.tar, rec.view) != (s, v):
            rep.problems.append(f"{rel}: holds unit s{rec.tar} v{rec.view}")
            continue
        if not (s < len(m.dataset.shards) and v < m.num_views):
            rep.problems.append(f"{rel}: unit outside the manifest's {len(m.dataset.shards)} tars × {m.num_views} views")
            continue
        sh = m.dataset.shards[s]
        if rec.url != sh.url or rec.count != sh.count:
            rep.problems.append(f"{rel}: tar {rec.url} with {rec.count} samples, the manifest has {sh.url} "
                                f"with {sh.count}")
        if rec.valid != rec.count - len(rec.skipped):
            rep.problems.append(f"{rel}: valid {rec.valid} ≠ count {rec.count} − skipped {len(rec.skipped)}")
        if set(rec.array_sha256) != set(m.arrays):
            rep.problems.append(f"{rel}: records arrays {sorted(rec.array_sha256)}, the manifest {sorted(m.arrays)}")
        done[(s, v)] = rec
        rep.count("unit records")
    if m.status == "complete":
        missing = [(s, v) for s in range(len(m.dataset.shards)) for v in range(m.num_views) if (s, v) not in done]
        for s, v in missing:
            rep.problems.append(f"{layout.unit_record_path(s, v)}: missing or unreadable in a complete cache")
        # the totals can be recomputed only from records that name the manifest's arrays (a mismatch is
        # reported above, per record)
        if not missing and done and all(set(r.array_sha256) == set(m.arrays) for r in done.values()):
            from .plan import summarize  # the job's own totals, recomputed from the completion records

            st = summarize(m, list(done.values()), None)
            for key in ("num_valid_rows", "num_skipped", "bytes_total", "bytes_per_target"):
                if getattr(st, key) != getattr(m.stats, key):
                    rep.problems.append(f"{layout.MANIFEST}: stats.{key} {getattr(m.stats, key)} ≠ "
                                        f"{getattr(st, key)} from the unit records")
    for s in range(len(m.dataset.shards)):
        rel = layout.index_path(s)
        try:
            keys = store.read_index(s)
        except Exception as e:  # noqa: BLE001
            rep.problems.append(f"{rel}: unreadable: {e}")
            continue
        if len(keys) != m.dataset.shards[s].count:
            rep.problems.append(f"{rel}: {len(keys)} keys, the manifest counts {m.dataset.shards[s].count}")
    return done


def _arrays(store: CacheStore, m: Manifest, done: dict[tuple[int, int], UnitCompletion], rep: VerifyReport,
            progress: bool) -> None:
    C = m.teacher.num_classes
    for (s, v), rec in tqdm(sorted(done.items()), desc="verify units", unit="unit", disable=not progress):
        for name in m.arrays:
            stored = store.read_shard_object(m, name, s, v)
            if _sha(stored) != rec.array_sha256.get(name) or len(stored) != rec.array_bytes.get(name):
                key = layout.array_shard_key(name, s, v, len(m.arrays[name].shape) - 2)
                rep.problems.append(f"{key}: sha256/size do not match {layout.unit_record_path(s, v)}")
            rep.count("array shards hashed")
        try:
            rows = store.read_unit(m, s, v)
        except Exception as e:  # noqa: BLE001 - a chunk that fails its crc32c or zstd lands here
            rep.problems.append(f"unit s{s} v{v}: a chunk does not decode: {type(e).__name__}: {e}")
            continue
        rep.count("units decoded")
        valid = rows[A.VALID].astype(bool).reshape(-1)
        if int(valid.sum()) != rec.valid:
            rep.problems.append(f"unit s{s} v{v}: {int(valid.sum())} rows flagged valid, the record says {rec.valid}")
        labels = rows[A.LABEL].reshape(-1)[valid]
        if labels.size and (labels.min() < 0 or labels.max() >= C):
            rep.problems.append(f"unit s{s} v{v}: labels outside [0, {C})")
        for name, a in rows.items():
            if a.dtype.kind == "f" and not np.isfinite(a[valid]).all():
                rep.problems.append(f"unit s{s} v{v}: {name} holds NaN or inf in valid rows")


def _teacher(store: CacheStore, m: Manifest, checkpoint: str, samples: int, rep: VerifyReport,
             input_storage_options: dict | None) -> None:
    """Replay ``samples`` cached views through the live teacher and compare with the stored rows.

    Views are taken from units in a seeded random order, a few per unit, replayed from their
    stored records with the job's own code (``pipeline.views``) and encoded with its codec. A mixed
    view (``views.mix``) is mixed with its partner replayed by the partner's own record of the same
    unit (``replay_view``), as the caching job did: the teacher is compared on the mixed image."""
    import torch

    from .targets import encode_targets, to_numpy
    from .tars import iter_samples
    from .teacher import Teacher
    from .views import replay_view

    try:
        teacher = Teacher.from_manifest(m, checkpoint)
    except CacheMismatchError as e:
        rep.problems.append(f"--teacher {e}")
        return
    recipe = m.config.views
    codecs = m.codecs()
    names = [n for c in codecs for n in c.names] + [A.PRED_TOP1]
    rng = np.random.default_rng(12345)
    units = [(s, v) for s in range(len(m.dataset.shards)) for v in range(m.num_views)]
    per_unit = max(1, -(-samples // len(units)))
    xs, keys, want = [], [], {n: [] for n in names}
    for k in rng.permutation(len(units)):
        if len(xs) >= samples:
            break
        s, v = units[k]
        rows = store.read_unit(m, s, v)
        valid = np.flatnonzero(rows[A.VALID].reshape(-1))
        pick = set(rng.choice(valid, size=min(per_unit, len(valid)), replace=False).tolist()) if len(valid) else set()
        records = {p: decode_view(rows, p) for p in pick}
        need = pick | {r.mix.partner for r in records.values() if r.mix is not None and r.mix.mode != "none"}
        images = {sample.position: sample.image
                  for sample in iter_samples(m.dataset.shards[s].url, input_storage_options, on_bad_sample="skip")
                  if sample.position in need and sample.image is not None}
        kw = dict(size=teacher.input_size, mean=teacher.mean, std=teacher.std)
        for p in sorted(pick):
            if len(xs) >= samples or p not in images:
                continue
            rec, partner = records[p], None
            if rec.mix is not None and rec.mix.mode != "none":
                q = rec.mix.partner
                if q not in images:
                    rep.problems.append(f"shard {s} view {v} position {p}: its mix partner, position {q}, "
                                        "has no decodable sample in the tar")
                    continue
                partner = (images[q], decode_view(rows, q))
            x = replay_view(images[p], rec, recipe, partner=partner, **kw)
            xs.append(x)
            keys.append((recipe.seed, s, p, v))
            for n in names:
                want[n].append(rows[n][p])
    if not xs:
        rep.problems.append("teacher comparison: no valid cached view to replay")
        return
    with torch.no_grad():
        live = to_numpy(encode_targets(teacher(torch.stack(xs), keys), codecs)[0])
    for n in names:
        got, ref = live[n].reshape(len(xs), -1), np.stack(want[n]).reshape(len(xs), -1)
        if got.dtype.kind in "iu":
            agree = float(np.mean(got == ref))
            if agree < 0.99:  # top-k indices may swap on exact ties
                rep.problems.append(f"{n}: the live teacher agrees on {agree:.1%} of entries over {len(xs)} views")
        else:
            g, r = got.astype(np.float64), ref.astype(np.float64)
            rel = float(np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-12))
            if rel > 2e-2:
                rep.problems.append(f"{n}: the live teacher differs from the cache, relative error {rel:.2e} "
                                    f"over {len(xs)} views")
        rep.count("teacher arrays compared")
    rep.count("teacher views replayed", len(xs))

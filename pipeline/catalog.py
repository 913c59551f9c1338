"""Caches under a root URL: find them, name them by identity, choose one to reuse or extend.

A *root* is any fsspec folder (``/data/caches``, ``s3://bkt/kd``) holding caches at any depth
up to ``max_depth``. Discovery walks it one level at a time and stops descending at a folder
with a ``manifest.json`` or ``lease.json`` (a cache, or one whose job is starting), so it
never lists the millions of chunk objects inside a cache. Each cache is read through its
manifest only (no array is opened).

Used by ``kdcache ls``, by ``kdcache cache`` with ``output.root`` (find a cache with the same
identity and reuse, resume or grow it; or one of the same lineage whose tars are a prefix of
the requested ones, and extend it; else create one) and by student configs that name a cache
as ``cache.root`` + ``cache.id``.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from storage_schemas import layout
from storage_schemas.errors import CacheError, ConfigError, NotFoundError
from storage_schemas.identity import MIN_PREFIX, SHORT
from storage_schemas.manifest import Manifest

from .store import CacheStore, url_to_fs


@dataclass
class CacheEntry:
    """One cache found under a root, as ``kdcache ls`` shows it."""

    url: str
    status: str  # complete | building | growing | starting | unreadable
    identity: str | None = None
    lineage: str | None = None
    teacher: str | None = None
    weights_sha256: str | None = None
    dataset_fingerprint: str | None = None
    num_samples: int = 0
    num_shards: int = 0
    num_views: int = 0
    targets: list[str] = field(default_factory=list)
    bytes_total: int = 0
    created: str | None = None
    updated: str | None = None
    tar_urls: list[str] = field(default_factory=list)
    problem: str | None = None  # why it is unreadable, or who holds a starting cache

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("tar_urls")
        return d


def join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


def _target_names(m: Manifest) -> list[str]:
    return [c.label() for c in m.codecs()] + (["tpp"] if m.tpp else [])


def entry_of(store: CacheStore) -> CacheEntry:
    """Describe the cache at ``store`` from its manifest (never raises for a damaged one)."""
    if not store.exists(layout.MANIFEST):
        holder = ""
        if store.exists(layout.LEASE):
            try:
                lease = json.loads(store.read_bytes(layout.LEASE))
                holder = f"job {lease.get('job_id')} on {lease.get('host')} since {lease.get('started')}"
            except ValueError:
                holder = "unreadable lease"
        return CacheEntry(url=store.url, status="starting", problem=holder or None)
    try:
        m = Manifest.parse(store.read_bytes(layout.MANIFEST).decode(), where=store.url)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign manifest is listed, not fatal
        return CacheEntry(url=store.url, status="unreadable", problem=str(e).splitlines()[0])
    status = "growing" if m.status == "complete" and store.exists(layout.GROWTH) else m.status
    return CacheEntry(
        url=store.url, status=status, identity=m.identity or m.content_identity(), lineage=m.lineage(),
        teacher=m.teacher.model, weights_sha256=m.teacher.weights_sha256,
        dataset_fingerprint=m.dataset.fingerprint, num_samples=m.dataset.num_samples,
        num_shards=len(m.dataset.shards), num_views=m.num_views, targets=_target_names(m),
        bytes_total=m.stats.bytes_total + (m.tpp.bytes if m.tpp else 0), created=m.created, updated=m.updated,
        tar_urls=[s.url for s in m.dataset.shards],
    )


def _protocol_prefix(url: str, fs) -> str:
    """``s3://`` (etc.) to put back on the protocol-less paths fsspec lists, '' for local paths."""
    m = re.match(r"^([a-z][a-z0-9+.-]*)://", url)
    return m.group(0) if m and m.group(1) not in ("file", "local") else ""


def discover(root: str, storage_options: dict | None = None, *, max_depth: int = 3,
             missing_ok: bool = False) -> list[CacheEntry]:
    """Every cache under ``root`` (itself included), sorted by URL."""
    fs, path = url_to_fs(root, storage_options)
    prefix = _protocol_prefix(root, fs)
    if not fs.exists(path):
        if missing_ok:
            return []
        raise NotFoundError(f"{root}: no such folder (nothing to list)")
    found: list[CacheEntry] = []
    level = [path]
    for _ in range(max_depth + 1):
        nxt = []
        for d in level:
            fs.invalidate_cache(d)  # a listing cached by this process may predate other jobs' caches
            names = {p.rstrip("/").rsplit("/", 1)[-1]: p for p in fs.ls(d, detail=False)}
            if layout.MANIFEST in names or layout.LEASE in names:
                found.append(entry_of(CacheStore(prefix + d, storage_options, read_only=True)))
                continue
            nxt += [p.rstrip("/") for n, p in names.items() if not n.startswith(".") and fs.isdir(p)]
        level = nxt
        if not level:
            break
    return sorted(found, key=lambda e: e.url)


def find_cache(root: str, ident: str, storage_options: dict | None = None, *, max_depth: int = 3) -> CacheEntry:
    """The complete cache under ``root`` whose identity starts with ``ident``; a clear error when none or
    several match (naming what is there)."""
    ident = ident.strip().lower()
    if len(ident) < MIN_PREFIX or not re.fullmatch(r"[0-9a-f]+", ident):
        raise ConfigError(f"cache id {ident!r}: give at least {MIN_PREFIX} hex digits of a cache identity "
                         f"(kdcache ls {root} lists them)")
    entries = discover(root, storage_options, max_depth=max_depth)
    hits = [e for e in entries if e.identity and e.identity.startswith(ident)]
    listing = "; ".join(f"{(e.identity or '-')[:SHORT]} {e.status} {e.url}" for e in entries) or "no caches"
    if not hits:
        raise NotFoundError(f"no cache with identity {ident}… under {root} ({listing})")
    if len({e.identity for e in hits}) > 1:
        raise ConfigError(f"cache id {ident} is ambiguous under {root}: " +
                         ", ".join(f"{e.identity[:SHORT]} at {e.url}" for e in hits) + "; give more digits")
    done = [e for e in hits if e.status == "complete"]
    if not done:
        raise CacheError(f"cache {ident}… under {root} is not complete ({hits[0].status} at {hits[0].url}); "
                                "finish it by rerunning its kdcache cache job")
    return max(done, key=lambda e: e.num_views)


Action = Literal["reuse", "resume", "grow", "extend", "create"]


@dataclass
class Choice:
    action: Action
    url: str
    entry: CacheEntry | None = None

    def describe(self, num_views: int, urls: list[str]) -> str:
        e = self.entry
        if self.action == "create":
            return f"creating a new cache at {self.url} (no cache with this identity under the root)"
        assert e is not None
        ident = (e.identity or "")[:SHORT]
        if self.action == "reuse":
            return (f"reusing cache {ident} at {self.url}: complete, {e.num_views} views ≥ {num_views} asked; "
                    "nothing to compute")
        if self.action == "resume":
            return f"resuming cache {ident} at {self.url} ({e.status})"
        if self.action == "grow":
            return f"growing cache {ident} at {self.url}: adding views {e.num_views}..{num_views - 1} only"
        return (f"extending cache {ident} at {self.url} with {len(urls) - e.num_shards} new tar(s) "
                f"(same teacher, recipe and targets; its {e.num_shards} tars are kept)")


def choose(entries: list[CacheEntry], *, identity: str, lineage: str, urls: list[str], num_views: int,
           root: str, name: str) -> Choice:
    """What ``kdcache cache`` with ``output.root`` does: reuse/resume/grow a cache with this identity, else
    extend one of this lineage whose tars are a prefix of ``urls``, else create ``root/name``."""
    same = [e for e in entries if e.identity == identity]
    if same:
        rank = {"complete": 0, "growing": 1, "building": 2}
        e = min(same, key=lambda e: (rank.get(e.status, 3), -e.num_views))
        if e.status in ("complete", "growing"):  # growing: its manifest still describes a complete cache
            return Choice("reuse" if e.num_views >= num_views else "grow", e.url, e)
        return Choice("resume", e.url, e)
    ext = [e for e in entries if e.lineage == lineage and e.status in ("complete", "growing")
           and len(e.tar_urls) < len(urls) and urls[:len(e.tar_urls)] == e.tar_urls]
    if ext:
        e = max(ext, key=lambda e: len(e.tar_urls))
        return Choice("extend", e.url, e)
    taken = {e.url.rstrip("/") for e in entries}
    url, n = join(root, name + ".zarr"), 1
    while url in taken:  # a different cache already has this name (it was extended since): pick another
        n += 1
        url = join(root, f"{name}-{n}.zarr")
    return Choice("create", url)


def cache_name(teacher_model: str, identity: str) -> str:
    """Folder name of a new cache under a root: the teacher's timm name and the short identity."""
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', teacher_model)}-{identity[:SHORT]}"

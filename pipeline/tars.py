"""Reading the input: ImageNet-style WebDataset tars behind any fsspec URL (DESIGN.md, Inputs).

(About 420 lines, kept in one module: URL expansion, the tar stream with its end check, grouping,
the index pass and sample parsing share one key rule and one bad-input policy, and are read together.)

A tar flows through small generator stages, each testable on its own:

    _members   tar members ``(name, bytes)`` streamed through fsspec; the end-of-archive is checked
    _group     members grouped into samples by webdataset's key rule; duplicates raised or dropped
    _parse     one sample: image decoded to RGB, label from ``KEY.cls``, metadata from ``KEY.json``

``index_tar`` runs the first two without keeping member data: the keys and count a cache is
laid out by. ``iter_samples`` runs all three. A sample's identity is (tar index, position in
the tar) plus its key; positions count the samples kept, in tar order.

Conventions:
- key: a member's name up to the first ``.`` of its base name, extension lower-cased
  (webdataset's ``base_plus_ext``): ``n01440764/n01440764_10026.JPEG`` has key
  ``n01440764/n01440764_10026`` and extension ``jpeg``. So ``a.v2.jpg`` has key ``a`` and
  extension ``v2.jpg``: dotted keys are not supported (as in webdataset); such a sample is
  reported as having no image member, with a hint. Members without an extension and
  ``__meta__`` members are ignored, as webdataset ignores them.
- image: the first of ``jpg, jpeg, png, webp`` present. The content is sniffed, not trusted to
  the extension (ImageNet holds a PNG and CMYK files named .JPEG), but only raster formats that
  PIL decodes in-process are accepted (never EPS, which would run Ghostscript).
- colour: always 8-bit RGB (``pipeline.images.to_rgb``). Transparency is composited over black, i.e. the
  premultiplied colour, so fully transparent pixels carry no hidden colour whatever the encoder
  left there. 16-bit greyscale is scaled (65535 -> 255), not clipped. ICC profiles and EXIF
  orientation are not applied, as timm's and torchvision's loaders do not apply them either:
  the teacher sees images as it saw them in training.
- bad samples: ``on_bad_sample='error'`` raises ``BadSampleError`` naming URL, key and reason;
  ``'skip'`` yields the sample with ``image=None`` and ``skip_reason`` so that positions stay
  fixed. A damaged tar raises ``BadTarError`` (``'error'``) or keeps the complete samples
  before the damage (``'skip'``).
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import json
import logging
import os
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from braceexpand import braceexpand
from fsspec.core import split_protocol, url_to_fs
from PIL import Image, UnidentifiedImageError

from storage_schemas.errors import ConfigError, InputDataError, NotFoundError
from storage_schemas.views import ViewRecord

from .images import DECODE_ERRORS, IMAGE_FORMATS, decode_image

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

OnBad = Literal["error", "skip"]
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_TAR_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)
_GLOB = re.compile(r"[*?\[]")
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta
# webdataset's key rule (``webdataset.tariterators.base_plus_ext``, the same pattern), written here because importing
# webdataset imports torch: ~3 s of CPU in every Ray worker of the index pass, which needs neither (measured on
# this 2-core machine; tests/pipeline/test_tars.py checks it against webdataset's on awkward names).
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_INT = re.compile(rb"[+-]?[0-9]+")


def base_plus_ext(name: str) -> tuple[str, str] | tuple[None, None]:
    """A member's (key, extension) by webdataset's rule, or (None, None) where it has no extension."""
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2)) if m else (None, None)


class BadSampleError(InputDataError):
    """One sample cannot be used: ``URL: key KEY: REASON``."""

    def __init__(self, url: str, key: str, reason: str):
        super().__init__(f"{url}: key {key}: {reason}")
        self.url, self.key, self.reason = url, key, reason

    def __reduce__(self):  # picklable with its fields, so it survives Ray's transport
        return type(self), (self.url, self.key, self.reason)


class BadTarError(InputDataError):
    """A whole tar cannot be read as indexed: ``URL: REASON``."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"{url}: {reason}")
        self.url, self.reason = url, reason

    def __reduce__(self):
        return type(self), (self.url, self.reason)


class _Damaged(Exception):
    """Internal: the tar ends early or is corrupt (becomes BadTarError or TarIndex.truncated)."""

    def __init__(self, reason: str, cut_member: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.cut_member = cut_member  # the member whose data the damage cuts into, if any


TarDamaged = _Damaged  # public name for readers outside this module (pipeline.export_wds)


@dataclass
class TarIndex:
    url: str
    size: int  # bytes, from the file system
    keys: list[str]  # sample keys in tar order; position = index in this list
    truncated: str | None = None  # why the tar was cut short (on_bad_sample='skip' only)
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (key, reason) of members dropped in 'skip' mode

    @property
    def count(self) -> int:
        return len(self.keys)


@dataclass
class Sample:
    """One sample as it moves through the stages, in the caching job and the student's data path alike.

    :func:`iter_samples` creates it (key, position, decoded image, label, metadata; ``image`` None and
    ``skip_reason`` set for a bad sample in skip mode); later stages fill in what they add with
    ``dataclasses.replace``: the view index and its record, the view replayed as a tensor at the
    consumer's input (``x``; ``x_teacher`` at the teacher's, for an online teacher), and on the
    student side the sample's cache rows (``rows``: array name → this sample's row), which of the
    epoch's streams yielded it (``consumer``, see :mod:`student.plan`) and, for a mixed view, its mix
    partner (``partner``: the partner sample of the same tar, its image and label, ``record`` its own
    record of this sample's view index; see :func:`student.stream.with_partners`).
    """

    key: str
    position: int  # index of the sample in its tar
    image: Image.Image | None  # RGB; None when skipped
    label: int | None
    meta: dict[str, Any] | None  # KEY.json, when present
    skip_reason: str | None = None
    tar: int = 0  # index of its tar in the dataset (the cache's ``dataset.shards``)
    view: int | None = None
    record: ViewRecord | None = None
    x: torch.Tensor | None = None
    x_teacher: torch.Tensor | None = None
    rows: dict[str, np.ndarray] | None = None
    consumer: int | None = None  # the student stream that yielded it, of ``num_consumers`` (resume accounting)
    num_consumers: int | None = None
    partner: Sample | None = None  # the mix partner (student side; the job shares the partner's view instead)


# ---------------------------------------------------------------------------------------- URLs


def expand_urls(urls: str | list[str], storage_options: dict | None = None) -> list[str]:
    """Expand brace patterns, then globs (``* ? [``), into existing tar URLs.

    Order: as listed; each glob's matches sorted. Remote URLs keep their protocol
    (``s3://bkt/x.tar``); plain local paths come back absolute, so a URL names one file
    whatever the working directory of the worker that reads it.
    Raises FileNotFoundError naming a pattern that matches nothing or a listed file that is
    missing, and ValueError for a tar listed twice (it would be cached twice).
    """
    patterns = [urls] if isinstance(urls, str) else list(urls)
    if not patterns:
        raise ConfigError("no input URLs given (input.urls)")
    out: list[str] = []
    for pattern in patterns:
        for url in braceexpand(pattern):
            out.extend(_expand_one(url, storage_options or {}))
    seen: set[str] = set()
    for url in out:
        if url in seen:
            raise ConfigError(f"input tar listed twice: {url}")
        seen.add(url)
    return out


def _expand_one(url: str, storage_options: dict) -> list[str]:
    protocol, _ = split_protocol(url)
    fs, path = url_to_fs(url, **storage_options)
    # http(s) URLs carry '?' in query strings and cannot be listed: never globs.
    if _GLOB.search(path) and protocol not in ("http", "https"):
        if "::" in url:
            raise ConfigError(f"{url}: globs in chained fsspec URLs are not supported; list the files or use braces")
        found = sorted(p for p, info in fs.glob(path, detail=True).items() if info.get("type") == "file")
        if not found:
            raise NotFoundError(f"no input tar matches {url}")
        return [fs.unstrip_protocol(p) if protocol else p for p in found]
    if not fs.isfile(path):
        raise NotFoundError(f"input tar not found: {url}")
    return [url if protocol else os.path.abspath(url)]


# ---------------------------------------------------------------------------------------- tar stream


class _TailWindow:
    """Read-only file wrapper that keeps the last few chunks read, with their offsets.

    Written here because tarfile's stream mode (and so webdataset's ``tar_file_iterator``)
    ends quietly on a missing, short or invalid header block: a tar cut at a 512-byte boundary
    (an interrupted copy or upload) would read as a shorter, valid tar. Keeping the recent
    bytes lets ``_members`` check that the block after the last member is the all-zero
    end-of-archive marker, without buffering the tar.
    """

    def __init__(self, f: Any, keep: int = 8):
        self._f = f
        self.pos = 0
        self._chunks: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=keep)

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        if data:
            self._chunks.append((self.pos, data))
            self.pos += len(data)
        return data

    def block(self, start: int, n: int) -> bytes | None:
        """Bytes ``[start, start + n)`` as far as they were read; None if no longer kept."""
        if not self._chunks:
            return b"" if start >= self.pos else None
        first = self._chunks[0][0]
        if start < first:
            return None
        buf = b"".join(c for _, c in self._chunks)
        return buf[start - first:start - first + n]


def _open(url: str, storage_options: dict | None) -> tuple[Any, str]:
    return url_to_fs(url, **(storage_options or {}))


def _members(fs: Any, path: str, *, read_data: bool = True) -> Iterator[tuple[str, bytes | None]]:
    """Regular files of a tar as ``(name, data)``, in order; data is None unless ``read_data``.

    Compression is fsspec's, inferred from the name (``.tar.gz``; ``.tgz`` too).
    Ends by raising ``_Damaged`` when the tar is cut short or corrupt. The member loop is our
    own, not webdataset's ``tar_file_iterator``, because the end check needs the TarFile.
    """
    compression = "gzip" if path.endswith(".tgz") else "infer"
    with fs.open(path, "rb", compression=compression) as raw:
        src = _TailWindow(raw)
        last: tuple[str, int] | None = None  # the member being read or last yielded, and where its data ends
        try:
            tar = tarfile.open(fileobj=src, mode="r|")
            for info in tar:
                if not info.isreg() or ("/" not in info.name and _META.match(info.name)):
                    continue
                last = (info.name, info.offset_data + info.size)
                data = tar.extractfile(info).read() if read_data else None
                yield info.name, data
                tar.members = []  # stream mode keeps every TarInfo otherwise (webdataset does the same)
        except _TAR_ERRORS as exn:
            # the same member is named whether its data was being read (sample pass) or skipped (index pass)
            cut = last[0] if last is not None and last[1] > src.pos else None
            raise _Damaged(f"tar corrupt or cut short (read {src.pos} bytes): {exn}", cut_member=cut) from exn
        end = tar.offset  # first byte after the last member's (padded) data
        block = src.block(end, tarfile.BLOCKSIZE)
        if block is None or len(block) < tarfile.BLOCKSIZE:
            raise _Damaged(f"tar cut short: it ends at byte {src.pos} without the end-of-archive marker "
                           f"(last complete member ends at byte {end})")
        if block.count(0) != tarfile.BLOCKSIZE:
            raise _Damaged(f"tar corrupt: invalid member header at byte {end}")


def raw_groups(url: str, fs: Any, path: str, on_bad_sample: OnBad = "error"
               ) -> Iterator[tuple[int, str, dict[str, bytes | None]]]:
    """``(position, key, {ext: encoded bytes})`` of the tar at ``path``, undecoded and grouped exactly as
    the index pass groups them (so keys and positions agree with a cache); ends by raising
    :class:`TarDamaged` when the tar is cut short or corrupt. For exporters that copy members byte for byte."""
    yield from _group(url, _members(fs, path), on_bad_sample)


def _group(url: str, members: Iterator[tuple[str, bytes | None]], on_bad_sample: OnBad,
           dropped: list[tuple[str, str]] | None = None) -> Iterator[tuple[int, str, dict[str, bytes | None]]]:
    """Group members into samples ``(position, key, {ext: data})`` by webdataset's key rule.

    Written here rather than with webdataset's ``group_by_keys``, which reports a duplicate
    member only through an exception's text and lets a key that comes back later in the tar
    through as a second sample. Here both are ``BadSampleError`` (``'error'``) or dropped
    keeping the first (``'skip'``), appending ``(key, reason)`` to ``dropped`` so that the drop is recorded. A sample is yielded once the next key starts; when ``members``
    ends with ``_Damaged`` the sample in progress is yielded if the damage cuts none of its members
    and it has an image and a label (its members all end before the damage), else it is dropped with
    the damaged tail. The index pass and the sample pass decide alike, so their keys agree.
    """
    key: str | None = None
    group: dict[str, bytes | None] = {}
    dropping = False  # the current key was already seen: 'skip' drops this later run of it
    seen: set[str] = set()
    position = 0
    try:
        for name, data in members:
            prefix, ext = base_plus_ext(name)
            if prefix is None:  # no extension: belongs to no sample
                continue
            ext = ext.lower()
            if prefix != key:
                if key is not None and not dropping:
                    yield position, key, group
                    position += 1
                key, group, dropping = prefix, {}, prefix in seen
                if dropping:
                    _bad(url, prefix, "duplicate key: its members are not adjacent in the tar, or it occurs twice",
                         on_bad_sample, dropped)
                seen.add(prefix)
            if ext in group:
                _bad(url, key, f"duplicate member {name}", on_bad_sample, dropped)
                continue
            group[ext] = data
    except _Damaged as exn:
        cut = base_plus_ext(exn.cut_member)[0] if exn.cut_member else None
        usable = "cls" in group and any(e in group for e in IMAGE_EXTS)
        if key is not None and not dropping and cut != key and usable:
            yield position, key, group
        raise
    if key is not None and not dropping:
        yield position, key, group


def _bad(url: str, key: str, reason: str, on_bad_sample: OnBad, dropped: list[tuple[str, str]] | None) -> None:
    if on_bad_sample == "error":
        raise BadSampleError(url, key, reason)
    log.warning("%s: key %s: %s (dropped, keeping the first)", url, key, reason)
    entry = (key, f"{reason} (dropped, the first kept)")
    if dropped is not None and entry not in dropped:
        dropped.append(entry)


def _check_policy(on_bad_sample: str) -> None:
    if on_bad_sample not in ("error", "skip"):
        raise ConfigError(f"on_bad_sample must be 'error' or 'skip', not {on_bad_sample!r}")


# ---------------------------------------------------------------------------------------- index


def index_tar(url: str, storage_options: dict | None = None, on_bad_sample: OnBad = "error") -> TarIndex:
    """Stream one tar and list its sample keys in order (member data is read and dropped)."""
    _check_policy(on_bad_sample)
    fs, path = _open(url, storage_options)
    size = fs.size(path)
    keys: list[str] = []
    truncated = None
    dropped: list[tuple[str, str]] = []
    try:
        for _, key, _ in _group(url, _members(fs, path, read_data=False), on_bad_sample, dropped):
            keys.append(key)
    except _Damaged as exn:
        if on_bad_sample == "error":
            raise BadTarError(url, exn.reason) from exn
        log.warning("%s: %s; keeping the %d complete samples before it", url, exn.reason, len(keys))
        truncated = exn.reason
    return TarIndex(url=url, size=size, keys=keys, truncated=truncated, dropped=dropped)


def dataset_fingerprint(tars: list[TarIndex]) -> str:
    """sha256 (hex) over (url, size, count) of every tar, in order."""
    rows = [[s.url, s.size, s.count] for s in tars]
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


# ---------------------------------------------------------------------------------------- samples


def iter_samples(url: str, storage_options: dict | None = None, *, on_bad_sample: OnBad = "error",
                 num_classes: int | None = None, keys: list[str] | None = None, tar: int = 0) -> Iterator[Sample]:
    """Stream one tar (index ``tar`` of its dataset) as decoded samples, in order.

    ``keys`` (from ``index_tar``) are checked against the stream: a different key at any
    position, or a different count, raises BadTarError ("tar changed since it was indexed").
    ``num_classes`` bounds labels to ``[0, num_classes)``; without it labels must be >= 0.
    """
    _check_policy(on_bad_sample)
    fs, path = _open(url, storage_options)
    count = 0
    try:
        for position, key, group in _group(url, _members(fs, path), on_bad_sample):
            if keys is not None and (position >= len(keys) or keys[position] != key):
                indexed = repr(keys[position]) if position < len(keys) else "no sample"
                raise BadTarError(url, f"tar changed since it was indexed: position {position} holds key "
                                         f"{key!r}, the index has {indexed}")
            count = position + 1
            try:
                image, label, meta = _parse(url, key, group, num_classes)
            except BadSampleError as exn:
                if on_bad_sample == "error":
                    raise
                yield Sample(key=key, position=position, image=None, label=None, meta=None, skip_reason=exn.reason,
                             tar=tar)
                continue
            yield Sample(key=key, position=position, image=image, label=label, meta=meta, tar=tar)
    except _Damaged as exn:
        if on_bad_sample == "error":
            raise BadTarError(url, exn.reason) from exn
        log.warning("%s: %s; stopping after the %d complete samples before it", url, exn.reason, count)
    if keys is not None and count != len(keys):
        raise BadTarError(url, f"tar changed since it was indexed: {count} samples read, the index has "
                                 f"{len(keys)}")


def _parse(url: str, key: str, group: dict[str, bytes | None], num_classes: int | None
           ) -> tuple[Image.Image, int, dict[str, Any] | None]:
    """Image, label and metadata of one sample; BadSampleError names what is wrong."""
    ext = next((e for e in IMAGE_EXTS if e in group), None)
    if ext is None:
        found = ", ".join(sorted(group))
        hint = " (keys end at the first '.' of a file name, as in webdataset)" if "." in found else ""
        raise BadSampleError(url, key, f"no image member ({'/'.join(IMAGE_EXTS)}); members: {found}{hint}")
    label = _label(url, key, group.get("cls"), num_classes)  # before decoding: cheaper
    meta = _meta(url, key, group.get("json"))
    try:
        image = decode_image(group[ext])
    except UnidentifiedImageError as exn:  # its text holds a memory address: not stable, not useful
        raise BadSampleError(url, key, f"{key}.{ext} is not a decodable image: content is none of "
                                       f"{', '.join(IMAGE_FORMATS)}") from exn
    except DECODE_ERRORS as exn:
        raise BadSampleError(url, key, f"{key}.{ext} is not a decodable image: {exn}") from exn
    return image, label, meta


def _label(url: str, key: str, data: bytes | None, num_classes: int | None) -> int:
    if data is None:
        raise BadSampleError(url, key, "no label member (KEY.cls)")
    text = data.strip()
    if not _INT.fullmatch(text):
        raise BadSampleError(url, key, f"label {text[:40]!r} in {key}.cls is not an integer")
    label = int(text)
    if label < 0 or (num_classes is not None and label >= num_classes):
        raise BadSampleError(url, key, f"label {label} out of range [0, {num_classes if num_classes else 'inf'})")
    return label


def _meta(url: str, key: str, data: bytes | None) -> dict[str, Any] | None:
    if data is None:
        return None
    try:
        meta = json.loads(data)
    except ValueError as exn:
        raise BadSampleError(url, key, f"{key}.json is not valid JSON: {exn}") from exn
    if not isinstance(meta, dict):
        raise BadSampleError(url, key, f"{key}.json is not a JSON object")
    return meta

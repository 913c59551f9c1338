"""Schema version of the cache format and the rule for reading one.

A cache records ``"MAJOR.MINOR"``. A reader knows one major version: it reads any
minor of that major (minors only add optional fields or arrays, which an older reader
ignores: ``Manifest.parse`` drops the fields of a later minor it does not know, while at its own
version an unknown field is refused as damage), and refuses every other major with a message that
says what to do. Readers before schema 1.4 did not drop them, so they refuse caches of 1.3 and later.
"""

from __future__ import annotations

from .errors import CacheError

SCHEMA_VERSION = "1.8"  # 1.1: checksums + manifest sidecar; 1.2: identity + history; 1.3: teacher.num_levels;
#                        1.4: logits_rest_logmass (top-k); 1.5: teacher.stochastic_depth, dataset.shards[].dropped;
#                        1.6: views.mix (Mixup/CutMix) and the view_mix_* arrays, written only when mixing;
#                        1.7: output.feature_compression, written only when "none" (taps stored without zstd);
#                        1.8: feature_compression defaults to "none" and is always written (a 1.7 manifest
#                             without it is "zstd": Manifest reads it so)


class IncompatibleSchemaError(CacheError):
    """The cache was written with a schema major version this reader does not know."""


def parse_version(version: str) -> tuple[int, int]:
    try:
        major, minor = (int(p) for p in version.split("."))
    except ValueError as e:
        raise IncompatibleSchemaError(
            f"schema_version {version!r} is not of the form 'MAJOR.MINOR'; the manifest is damaged "
            "or was not written by kdcache"
        ) from e
    return major, minor


def newer_minor(found: str) -> bool:
    """Whether ``found`` (a compatible version) is a later minor than this reader's: it may hold optional
    fields this reader does not know, which it ignores."""
    return parse_version(found) > parse_version(SCHEMA_VERSION)


def check_compatible(found: str, where: str = "cache") -> None:
    """Raise :class:`IncompatibleSchemaError` unless ``found`` can be read by this version."""
    major, _ = parse_version(found)
    ours, _ = parse_version(SCHEMA_VERSION)
    if major != ours:
        newer = major > ours
        raise IncompatibleSchemaError(
            f"{where} has schema version {found}, this kdcache reads {ours}.x only. "
            + (
                "Upgrade kdcache (pip install -U kdcache) to read it."
                if newer
                else "Rebuild the cache with this kdcache (kdcache cache CONFIG), or read it with an older kdcache."
            )
        )

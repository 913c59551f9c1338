"""What the parts of :mod:`bench.scale` share: the teachers and what each is cached for, the reader's caches
and configurations, the goals, the views' normalisation and the report's markers in ``bench/results.md``."""

from __future__ import annotations

SWIN, VIT = "swin_large_patch4_window7_224", "vit_large_patch16_224"
# teacher: the KD methods it is cached for (jobs.cache_for derives taps, logits and TPP tail from them)
TEACHERS = {SWIN: ("kd", "scalekd"), VIT: ("kd", "vitkd", "scalekd")}
WARM_TARS = 1  # the first tar of each job: the actor's warm-up, not in the steady state
SETTLE_S = 5.0  # seconds between a job's end and the forward's second half
# the reader's caches: (teacher, targets.feature_dtype, output.feature_compression, None: the default, taps
# without zstd since schema 1.8); the ViT-L taps also with zstd and as int8, to show what each costs the reader
# (the goals are set for the defaults)
READER_CACHES = {"swin": (SWIN, "fp16", None), "vit": (VIT, "fp16", None), "vit_zstd": (VIT, "fp16", "zstd"),
                 "vit_int8": (VIT, "int8", None)}
VIT_TAPS = ("block0", "block1", "final")
# reader configuration: (the cache it reads, logits, taps)
READER = {
    "images_only": ("swin", False, ()),
    "logits_top10": ("swin", True, ()),
    "scalekd_swinl_final": ("swin", False, ("final",)),
    "vitkd_3taps": ("vit", False, VIT_TAPS),
    "vitkd_3taps_zstd": ("vit_zstd", False, VIT_TAPS),
    "vitkd_3taps_int8": ("vit_int8", False, VIT_TAPS),
}
SOURCES = ("local", "s3")
GOALS = {"job_vs_forward": [(SWIN, 0.95), (VIT, 0.95)],
         "reader": [("scalekd_swinl_final", 0.95), ("vitkd_3taps", 0.90)]}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE = 224
MD_BEGIN, MD_END = "<!-- scale: begin (python -m bench --scale) -->", "<!-- scale: end -->"

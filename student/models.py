"""Students sized for small images, registered with timm so that configs name them like any timm model.

timm's Mixer entry points fix ``patch_size`` (``mixer_s16_224`` passes ``patch_size=16`` and a
second one is a ``TypeError``), so an MLP student at 32 px (the digits) needs an entry of its
own. Keyword arguments override every default here, as ``model_kwargs`` do in a config.
Importing the :mod:`student` package registers these.
"""

from __future__ import annotations

from timm.models import build_model_with_cfg, register_model
from timm.models.mlp_mixer import MlpMixer, checkpoint_filter_fn

_CFG = {"num_classes": 10, "input_size": (3, 32, 32), "crop_pct": 1.0, "interpolation": "bicubic",
        "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "first_conv": "stem.proj", "classifier": "head"}


@register_model
def mixer_t4_32(pretrained: bool = False, **kwargs) -> MlpMixer:
    """Mixer-T/4 at 32 px: patch 4 (an 8×8 token grid), 4 blocks of width 128, 10 classes; no weights."""
    cfg = kwargs.pop("pretrained_cfg", None) or _CFG
    args = {"img_size": 32, "patch_size": 4, "num_blocks": 4, "embed_dim": 128, "num_classes": 10, **kwargs}
    return build_model_with_cfg(MlpMixer, "mixer_t4_32", pretrained, pretrained_cfg=cfg,
                                pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg={"out_indices": args.pop("out_indices", 3), "feature_cls": "getter"},
                                **args)

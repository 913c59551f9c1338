"""TPP family adapters: which one a teacher gets, and the message for a teacher none supports."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer

from pipeline.tail_families import EvaFamily, SwinFamily, ViTFamily, family_of
from pipeline.tpp import tail_family
from tests.pipeline.test_tpp import DEIT3, DEIT_DIST, EVA02, ROPE_MIXED, SWIN, VIT


@pytest.mark.parametrize("case,adapter", [
    (VIT, ViTFamily), (DEIT_DIST, ViTFamily), (DEIT3, ViTFamily), (EVA02, EvaFamily), (ROPE_MIXED, EvaFamily),
    (SWIN, SwinFamily),
], ids=["vit", "deit_distilled", "deit3", "eva02", "eva_rope_mixed", "swin"])
def test_adapter_is_chosen_by_model_class(case, adapter):
    with torch.device("meta"):
        model = timm.create_model(case[0], pretrained=False, **case[1])
    assert type(family_of(model)) is adapter and tail_family(model) == adapter.name


def test_nearest_class_wins_whatever_the_registration_order():
    # classes deriving from two families' classes: the one first in the MRO decides
    class EvaFirst(Eva, VisionTransformer):
        pass

    class ViTFirst(VisionTransformer, Eva):
        pass

    assert family_of(EvaFirst.__new__(EvaFirst)).name == "eva"
    assert family_of(ViTFirst.__new__(ViTFirst)).name == "vit"


def test_unsupported_teacher_message():
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=10)
    with pytest.raises(TypeError) as e:
        family_of(resnet)
    assert str(e.value) == (
        "TPP pack: unsupported teacher timm.models.resnet.ResNet; supported families: vit (timm "
        "VisionTransformer: ViT, DeiT, DeiT-III), eva (timm Eva: EVA, EVA02), swin (timm SwinTransformer)")

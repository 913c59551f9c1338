"""Target compression against computations done by hand."""

import numpy as np
import pytest
import torch

from pipeline.targets import (
    compress_features,
    compress_logits,
    dequantize_int8,
    input_fingerprint,
    quantize_int8,
)
from storage_schemas import arrays as A


def test_topk_rebuilds_softmax_on_kept_classes():
    torch.manual_seed(0)
    z = torch.randn(6, 100) * 3
    arrays, fid = compress_logits(z, "topk", 10)
    vals, idx, lse = (arrays[A.LOGITS_TOPK_VALUES], arrays[A.LOGITS_TOPK_INDICES], arrays[A.LOGITS_LOGSUMEXP])
    assert vals.dtype == np.float16 and idx.dtype == np.int16 and lse.dtype == np.float32
    p = np.exp(z.double().numpy() - np.log(np.exp(z.double().numpy()).sum(1, keepdims=True)))
    for b in range(6):
        order = np.argsort(-z[b].numpy())[:10]
        assert list(idx[b]) == list(order)
        rebuilt = np.exp(vals[b].astype(np.float64) - lse[b])
        np.testing.assert_allclose(rebuilt, p[b, order], rtol=5e-3)
    assert fid.count == 6 and 0.99 < fid.cosine_sum / 6 <= 1.0 + 1e-9


def test_full_logits_and_index_dtype_for_many_classes():
    z = torch.randn(2, 40000)
    arrays, _ = compress_logits(z, "topk", 3)
    assert arrays[A.LOGITS_TOPK_INDICES].dtype == np.int32
    arrays, fid = compress_logits(z[:, :10], "full", 3)
    np.testing.assert_allclose(arrays[A.LOGITS_FULL], z[:, :10].numpy(), atol=2e-3)
    assert fid.rel_err_max < 1e-2


def test_int8_features_per_token_scale():
    torch.manual_seed(1)
    x = torch.randn(3, 7, 32) * torch.logspace(-2, 2, 7).view(1, 7, 1)
    q, scale = quantize_int8(x)
    # by hand: scale = max|x| / 127 per token, q = round(x / scale)
    s_hand = x.abs().amax(-1) / 127
    torch.testing.assert_close(scale, s_hand)
    torch.testing.assert_close(q.float(), torch.round(x / s_hand.unsqueeze(-1)))
    err = (dequantize_int8(q, scale) - x).abs().max(-1).values
    assert torch.all(err <= 0.5 * s_hand + 1e-6)
    arrays, fid = compress_features("t", x, "int8")
    assert arrays[A.feature_array("t")].dtype == np.int8 and arrays[A.feature_scale_array("t")].shape == (3, 7)
    assert fid.cosine_min > 0.999


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_feature_fidelity_numbers(dtype):
    x = torch.randn(4, 16, 24)
    arrays, fid = compress_features("t", x, dtype)
    stored = arrays[A.feature_array("t")].astype(np.float64)
    if dtype == "int8":
        stored = stored * arrays[A.feature_scale_array("t")][..., None]
    ref = x.double().numpy().reshape(4, -1)
    rel = np.linalg.norm(stored.reshape(4, -1) - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert fid.rel_err_max == pytest.approx(rel.max(), rel=1e-6)
    assert fid.rel_err_sum == pytest.approx(rel.sum(), rel=1e-6)


def test_fingerprint_is_area_average():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    fp = input_fingerprint(x, 2)
    assert fp.shape == (2, 12)
    assert fp[0, 0] == pytest.approx(float(x[0, 0, :4, :4].mean()), rel=1e-3)
    assert fp[1, 11] == pytest.approx(float(x[1, 2, 4:, 4:].mean()), rel=1e-3)

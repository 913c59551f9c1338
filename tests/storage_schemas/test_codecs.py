"""Target codecs against computations done by hand, and the contract every registered codec keeps."""

import numpy as np
import pytest
import torch

from pipeline.targets import input_fingerprint
from storage_schemas.codecs import (
    LOGITS_CODECS,
    TOKEN_CODECS,
    LogitsInfo,
    dequantize_int8,
    quantize_int8,
    tap_codec,
)
from storage_schemas.taps import TapInfo


def tap(dtype: str, tokens: int = 7, dim: int = 32, name: str = "t") -> TapInfo:
    return TapInfo(name=name, index=0, norm=False, tokens=tokens, dim=dim, grid=None, prefix_tokens=0, dtype=dtype)


def numpy_rows(rows: dict) -> dict:
    return {n: t.numpy() for n, t in rows.items()}


def test_topk_rebuilds_softmax_on_kept_classes():
    torch.manual_seed(0)
    z = torch.randn(6, 100) * 3
    codec = LogitsInfo(mode="topk", k=10, num_classes=100).codec()
    rows, fid = codec.encode(z)
    vals, idx, lse = (numpy_rows(rows)[n] for n in codec.names)
    assert vals.dtype == np.float16 and idx.dtype == np.int16 and lse.dtype == np.float32
    p = np.exp(z.double().numpy() - np.log(np.exp(z.double().numpy()).sum(1, keepdims=True)))
    for b in range(6):
        order = np.argsort(-z[b].numpy())[:10]
        assert list(idx[b]) == list(order)
        rebuilt = np.exp(vals[b].astype(np.float64) - lse[b])
        np.testing.assert_allclose(rebuilt, p[b, order], rtol=5e-3)
    assert fid.count == 6 and 0.99 < fid.cosine_sum / 6 <= 1.0 + 1e-9
    top = codec.decode(rows)  # log-probs on the kept classes, by hand: value - logsumexp
    np.testing.assert_allclose(top.log_probs.numpy(), vals.astype(np.float32) - lse[:, None], rtol=1e-6)
    assert top.indices.dtype == torch.int64


def test_full_logits_and_index_dtype_for_many_classes():
    z = torch.randn(2, 40000)
    rows, _ = LogitsInfo(mode="topk", k=3, num_classes=40000).codec().encode(z)
    assert rows["logits_topk_indices"].dtype == torch.int32
    codec = LogitsInfo(mode="full", k=3, num_classes=10).codec()
    rows, fid = codec.encode(z[:, :10])
    np.testing.assert_allclose(numpy_rows(rows)["logits_full"], z[:, :10].numpy(), atol=2e-3)
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
    rows, fid = tap_codec(tap("int8")).encode(x)
    assert rows["feat_t"].dtype == torch.int8 and rows["feat_t_scale"].shape == (3, 7)
    assert fid.cosine_min > 0.999


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_feature_fidelity_numbers(dtype):
    x = torch.randn(4, 16, 24)
    rows, fid = tap_codec(tap(dtype, 16, 24)).encode(x)
    stored = rows["feat_t"].double().numpy()
    if dtype == "int8":
        stored = stored * rows["feat_t_scale"].double().numpy()[..., None]
    ref = x.double().numpy().reshape(4, -1)
    rel = np.linalg.norm(stored.reshape(4, -1) - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert fid.rel_err_max == pytest.approx(rel.max(), rel=1e-6)
    assert fid.rel_err_sum == pytest.approx(rel.sum(), rel=1e-6)


CODECS = ([("logits", m) for m in LOGITS_CODECS] + [("tap", d) for d in TOKEN_CODECS])


@pytest.mark.parametrize("kind,name", CODECS, ids=[f"{k}:{n}" for k, n in CODECS])
def test_every_codec_keeps_the_contract(kind, name):
    """Whatever a codec is, its rows are exactly the arrays it declares (names, dtypes, inner shapes), its
    decode is close to what was encoded (within its own fidelity figure), and it is deterministic."""
    torch.manual_seed(3)
    if kind == "logits":
        x = torch.randn(5, 12) * 8  # peaked, so that 4 kept classes hold nearly all the mass
        codec = LOGITS_CODECS[name](LogitsInfo(mode=name, k=4, num_classes=12))
    else:
        x = torch.randn(5, 6, 8)
        codec = tap_codec(tap(name, 6, 8))
    rows, fid = codec.encode(x)
    specs = {a.name: a for a in codec.arrays()}
    assert list(rows) == list(specs) == codec.names
    for n, r in rows.items():
        assert str(r.dtype).removeprefix("torch.") == specs[n].dtype and tuple(r.shape) == (5, *specs[n].inner)
        assert specs[n].target == codec.target
    again, _ = codec.encode(x.clone())
    assert all(torch.equal(rows[n], again[n]) for n in rows)
    out = codec.decode(rows)
    if kind == "tap":  # tokens come back as fp32 within the stored precision
        assert out.dtype == torch.float32 and out.shape == x.shape
        rel = float((out - x).norm() / x.norm())
        assert rel <= fid.rel_err_max + 1e-6 and rel < 0.02
    assert fid.count == 5 and fid.cosine_min > 0.98 and codec.describe() and codec.label()


def test_fingerprint_is_area_average():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    fp = input_fingerprint(x, 2)
    assert fp.shape == (2, 12)
    assert fp[0, 0] == pytest.approx(float(x[0, 0, :4, :4].mean()), rel=1e-3)
    assert fp[1, 11] == pytest.approx(float(x[1, 2, 4:, 4:].mean()), rel=1e-3)

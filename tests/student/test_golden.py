"""Golden values for the ScaleKD cross-attention projector (CAP) and the ViTKD generation path
and losses. The fixtures come from tests/fixtures/golden/make_golden.py, a separate float64
numpy implementation of the formulas in reference/methods.md that does not import kdcache. The
modules run in float64 with the fixture's parameters loaded by name (strict). A missing fixture
fails the test; it never skips."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from storage_schemas.taps import TapInfo
from student.methods import StudentInfo, StudentOutput, TeacherContext, build_methods
from student.methods.scalekd import CrossAttentionProjector
from student.targets import TeacherTargets

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden"
TIGHT = dict(rtol=1e-9, atol=1e-10)
# ViTKD reduces its losses in float32 on purpose (``.float()``, safe under AMP), so the loss
# values can only match the float64 reference to float32 rounding; everything before the
# reduction is checked at TIGHT.
LOSS_F32 = dict(rtol=1e-6, atol=0.0)
CAP_CASES = ("cap_learned_query", "cap_given_query")
VITKD_CASES = ("vitkd_projected", "vitkd_identity")


@dataclass
class Golden:
    param: dict[str, torch.Tensor]
    input: dict[str, torch.Tensor]
    expect: dict[str, torch.Tensor]
    config: dict[str, int | float | bool]


def load(case: str) -> Golden:
    """``<case>.npz`` → float tensors in float64 (ints and bools kept); fails when missing."""
    path = GOLDEN / f"{case}.npz"
    if not path.is_file():
        pytest.fail(f"golden fixture {path} is missing; regenerate it with python {GOLDEN / 'make_golden.py'}")
    groups: dict[str, dict] = {"param": {}, "input": {}, "expect": {}, "config": {}}
    with np.load(path) as z:
        for key in z.files:
            group, name = key.split("/", 1)
            groups[group][name] = z[key]
    config = {k: v.item() for k, v in groups.pop("config").items()}

    def tensor(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a)
        return t.double() if t.is_floating_point() else t

    return Golden(**{g: {k: tensor(v) for k, v in d.items()} for g, d in groups.items()}, config=config)


def test_a_missing_fixture_fails_not_skips():
    with pytest.raises(pytest.fail.Exception, match="missing"):
        load("no_such_case")


# --------------------------------------------------------------------------- ScaleKD CAP


def build_cap(g: Golden, softmax_scale: float | None = None) -> CrossAttentionProjector:
    c = g.config
    cap = CrossAttentionProjector((c["student_channels"], c["height"], c["width"]), c["dim"], c["num_queries"],
                                  num_heads=c["num_heads"], softmax_scale=softmax_scale or c["softmax_scale"],
                                  learn_query=c["learn_query"], query_proj=c["query_proj"]).double()
    cap.load_state_dict(g.param, strict=True)
    return cap


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("case", CAP_CASES)
def test_cap_matches_golden(case, mode):
    g = load(case)
    cap = build_cap(g).train(mode == "train")
    with torch.no_grad():
        out = cap(g.input["x"], g.input.get("query"))
    torch.testing.assert_close(out, g.expect[f"out_{mode}"], **TIGHT)
    bn = "proj_student.1"
    state = cap.state_dict()
    for stat in ("running_mean", "running_var"):
        want = g.expect[f"train_{bn}.{stat}"] if mode == "train" else g.param[f"{bn}.{stat}"]
        torch.testing.assert_close(state[f"{bn}.{stat}"], want, **TIGHT)
    assert state[f"{bn}.num_batches_tracked"] == g.param[f"{bn}.num_batches_tracked"] + (mode == "train")


@pytest.mark.parametrize("case", CAP_CASES)
def test_cap_golden_is_sensitive_to_the_attention_scale(case):
    """With softmax_scale 1.0 instead of the fixture's 5.0 the output moves far beyond any
    tolerance, so a wrong attention scale cannot pass :func:`test_cap_matches_golden`."""
    g = load(case)
    assert g.config["softmax_scale"] != 1.0
    with torch.no_grad():
        out = build_cap(g, softmax_scale=1.0).eval()(g.input["x"], g.input.get("query"))
    want = g.expect["out_eval"]
    assert (out - want).abs().max() > 0.1 * want.abs().max()


# --------------------------------------------------------------------------- ViTKD


@pytest.mark.parametrize("case", VITKD_CASES)
def test_vitkd_generation_and_losses_match_golden(case, monkeypatch):
    g = load(case)
    c = g.config
    B, Ds, Dt, h, w = c["batch"], c["student_dim"], c["teacher_dim"], c["grid_h"], c["grid_w"]
    N, K = h * w, 10
    taps = [TapInfo(name=name, index=i, norm=name == "final", tokens=N, dim=Dt, grid=(h, w), prefix_tokens=0,
                    dtype="fp16") for i, name in enumerate(("block0", "block1", "final"))]
    info = StudentInfo(shapes=((Ds, h, w),) * 2, final_tokens=(N, Ds), vit_like=True)
    opts = {k: c[k] for k in ("alpha", "beta", "mask_ratio", "divide_by_lambda")}
    m = build_methods("vitkd", {"vitkd": opts}, info, TeacherContext(num_classes=K, taps=taps))[0].double()
    m.load_state_dict(g.param, strict=True)

    mask = g.input["mask"]

    def fixture_mask(self, batch: int, tokens: int, device: torch.device) -> torch.Tensor:
        assert (batch, tokens) == tuple(mask.shape)
        return mask.to(device)

    monkeypatch.setattr(type(m), "random_mask", fixture_mask)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, module in (("shallow0", m.align_shallow[0]), ("shallow1", m.align_shallow[1]),
                         ("generation", m.generation)):
        module.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, (args[0], out)))

    out = StudentOutput(logits=torch.zeros(B, K, dtype=torch.float64),
                        features={0: g.input["student_block0"], 1: g.input["student_block1"]},
                        final_tokens=g.input["student_final"])
    tgt = TeacherTargets(num_classes=K, features={t: g.input[f"teacher_{t}"] for t in ("block0", "block1", "final")})
    with torch.no_grad():
        losses = m(out, tgt, torch.zeros(B, dtype=torch.long))

    for layer in (0, 1):
        torch.testing.assert_close(seen[f"shallow{layer}"][1], g.expect[f"shallow{layer}"], **TIGHT)
    gen_in, gen_out = seen["generation"]
    torch.testing.assert_close(gen_in, g.expect["generation_in"], **TIGHT)  # the given mask, row-major grid
    torch.testing.assert_close(gen_out, g.expect["generation_out"], **TIGHT)
    assert set(losses) == {"loss_vitkd_lr", "loss_vitkd_gen"}
    for key in losses:
        torch.testing.assert_close(losses[key].double(), g.expect[key], **LOSS_F32)

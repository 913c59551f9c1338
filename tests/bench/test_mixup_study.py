"""bench.mixup_study writes its numbers where the issue asks, keeping everything else of the report."""

from __future__ import annotations

import json

from bench import common, mixup_study


def _res(top1: dict) -> dict:
    rows = [{"condition": k, "top1_mean": sum(v) / len(v), "top1_std": 0.0, "top1_per_seed": v} for k, v in top1.items()]
    return {"student": "s", "epochs": 6, "seeds": [0, 1], "mix": mixup_study.MIX, "rows": rows, "mixup": top1}


def test_save_sets_studies_mixup_and_replaces_only_its_own_section(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "OUT", tmp_path)
    monkeypatch.setattr(mixup_study, "OUT", tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"ratios": {"a": 1.0}}))
    (tmp_path / "results.md").write_text("# report\n\n## Goals\n- met: x\n")
    scale = "\n<!-- scale: begin -->\n## Real scale\n<!-- scale: end -->\n"
    first = {"no_mix": [60.0, 62.0], "cached_mix": [58.0, 59.0], "online_mix": [57.0, 61.0]}
    mixup_study.save(_res(first))
    with (tmp_path / "results.md").open("a") as f:  # another section after it (bench.scale's)
        f.write(scale)
    second = {k: [v[0] + 1, v[1]] for k, v in first.items()}
    mixup_study.save(_res(second))
    data = json.loads((tmp_path / "results.json").read_text())
    assert data == {"ratios": {"a": 1.0}, "studies": {"mixup": second}}
    md = (tmp_path / "results.md").read_text()
    assert md.startswith(f"# report\n\n## Goals\n- met: x\n\n{mixup_study.MD_BEGIN}\n## Mixed views: cached vs online")
    assert md.endswith(scale) and md.count("## Mixed views") == 1 and "| no_mix | 61.5 |" in md and "[61.0, 62.0]" in md
    assert json.loads((tmp_path / "mixup_study.json").read_text())["mixup"] == second


def test_a_partial_run_adds_its_conditions_to_the_last_one(tmp_path):
    path = tmp_path / "mixup_study.json"
    path.write_text(json.dumps({**_res({"no_mix": [60.0, 62.0], "cached_mix": [58.0, 59.0]}), "seconds": 5.0}))
    merged = mixup_study.merge_previous({**_res({"online_view_mix": [61.0, 63.0]}), "seconds": 1.0}, path)
    assert [r["condition"] for r in merged["rows"]] == ["no_mix", "cached_mix", "online_view_mix"]
    assert merged["mixup"] == {"no_mix": [60.0, 62.0], "cached_mix": [58.0, 59.0], "online_view_mix": [61.0, 63.0]}
    assert merged["seconds"] == 6.0
    other = {**_res({"online_view_mix": [61.0, 63.0]}), "epochs": 3, "seconds": 1.0}  # other settings: not merged
    assert mixup_study.merge_previous(other, path)["mixup"] == {"online_view_mix": [61.0, 63.0]}

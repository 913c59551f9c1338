"""Helpers shared by the benchmarks: device naming, data, result tables, and the statistics
that turn repeated, interleaved rounds into medians, spreads and a verdict per goal.

Each benchmark measures its configurations in rounds: within a round every configuration runs
once, interleaved with the others (:func:`round_orders`, :func:`interleave`). A ratio A/B is computed within each
round (paired), so a drift of the shared machine that is slow next to a round cancels out; it
is summarised by the median of the per-round ratios and a distribution-free interval for that
median (:func:`median_interval`). A goal "ratio ≥ target" is *met* when the whole interval is
at or above the target, *not met* when it is below, *undecided* when it straddles the target
(:func:`verdict`).
"""

from __future__ import annotations

import json
import math
import platform
import random
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

OUT = Path(__file__).parent
CONFIDENCE = 0.90  # the least coverage asked of a ratio's interval; 5 rounds give 0.9375


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def digits_data(workdir: Path) -> dict:
    from pipeline.digits import write_digits

    return write_digits(str(workdir / "data"))


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


RATIO_COLUMNS = ["ratio", "median", "interval", "rounds", "goal", "verdict"]


def ratio_rows(ratios: dict, spreads: dict, verdicts: list[dict]) -> list[dict]:
    """The rows of a ratios table: each ratio's median, its interval over paired rounds (if it has
    one) and its goal's verdict (if it has a goal)."""
    goals = {v["ratio"]: v for v in verdicts}
    rows = []
    for name, value in ratios.items():
        s, g = spreads.get(name), goals.get(name)
        rows.append({"ratio": name, "median": value,
                     "interval": f"{_fmt(s['interval'][0])}–{_fmt(s['interval'][1])}" if s else "one value",
                     "rounds": s["rounds"] if s else None, "goal": f"≥ {g['target']}" if g else None,
                     "verdict": g["verdict"] if g else None})
    return rows


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return "" if v is None else str(v)


def write_results(name: str, results: dict) -> Path:
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(results, indent=1))
    return path


def with_section(md: str, section: str, begin: str, end: str) -> str:
    """``md`` with the section between the marker lines ``begin`` and ``end`` replaced by ``section`` (which
    carries the markers), or ``section`` appended when ``md`` has none."""
    if begin in md and end in md:
        head, rest = md.split(begin, 1)
        return head + section.rstrip("\n") + rest.split(end, 1)[1]
    return md.rstrip("\n") + "\n\n" + section


def update_report(keys: Sequence[str], value, section: str, begin: str, end: str, out: Path | None = None) -> None:
    """One benchmark's part of the report, the rest kept: ``value`` at the nested key ``keys`` of
    ``results.json`` and ``section`` (marked by ``begin`` … ``end``) in ``results.md``, both in ``out``
    (default :data:`OUT`)."""
    out = OUT if out is None else out
    rj = out / "results.json"
    results = json.loads(rj.read_text()) if rj.exists() else {}
    node = results
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    rj.write_text(json.dumps(results, indent=1))
    md = out / "results.md"
    md.write_text(with_section(md.read_text() if md.exists() else "", section, begin, end))


# --- rounds and their statistics ---------------------------------------------------------------


def round_orders(names: Sequence[str], rounds: int, seed: int) -> list[list[str]]:
    """The order of the configurations in each round: a seeded shuffle per round, so that no
    configuration always runs first or always right after the same one."""
    rng = random.Random(seed)
    orders = []
    for _ in range(rounds):
        order = list(names)
        rng.shuffle(order)
        orders.append(order)
    return orders


def interleave(order: Sequence[str], steps: int, slice_steps: int) -> list[tuple[str, int]]:
    """One round as ``(configuration, steps)`` slices: every configuration runs ``steps`` steps in
    slices of at most ``slice_steps``, taking turns in ``order``, then in reverse (A B C, C B A,
    A B C, …). Each configuration's time in the round is then spread over the whole round, so all
    see the same load of a shared machine, and the reversal cancels a steady drift within it."""
    sizes = [slice_steps] * (steps // slice_steps) + ([steps % slice_steps] if steps % slice_steps else [])
    return [(name, n) for i, n in enumerate(sizes) for name in (order if i % 2 == 0 else order[::-1])]


def quantile(xs: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``xs`` by linear interpolation between order statistics (numpy's
    default, Hyndman–Fan type 7): position ``q·(n−1)`` in the sorted values."""
    if not xs:
        raise ValueError("quantile of no values")
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (pos - lo) * (s[hi] - s[lo])


def spread(xs: Sequence[float]) -> dict:
    """One configuration's rounds: ``median``, ``min``, ``max``, ``iqr`` = [q1, q3], ``rounds``."""
    return {"median": quantile(xs, 0.5), "min": min(xs), "max": max(xs),
            "iqr": [quantile(xs, 0.25), quantile(xs, 0.75)], "rounds": len(xs)}


def paired_ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """``num[i] / den[i]`` for each round ``i``: both sides measured in the same round."""
    if len(num) != len(den):
        raise ValueError(f"paired ratios need as many rounds on both sides, got {len(num)} and {len(den)}")
    return [a / b for a, b in zip(num, den, strict=True)]


def median_interval(xs: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """A distribution-free interval for the median of ``xs``: ``(low, high, coverage)``.

    The order-statistic (sign-test) interval ``[x_(k), x_(n+1−k)]`` holds the true median with
    probability ``1 − 2·P(Binomial(n, ½) ≤ k−1)``, whatever the distribution of the rounds, as
    long as they are independent; ``k`` is the largest that keeps that coverage ≥ ``confidence``.
    With 5–7 rounds that is min–max (coverage 0.9375 for 5); from 8 rounds on it drops the
    extreme rounds, so that one disturbed round does not widen it. Chosen over a bootstrap,
    which with 5 rounds can only resample the same 5 values and states a coverage it does not
    have. With too few rounds for ``confidence`` (1–4 at 0.90) it is min–max, with its lower
    coverage, which :func:`verdict` then refuses to decide on.
    """
    n = len(xs)
    if n == 0:
        raise ValueError("interval of no values")
    s = sorted(xs)

    def coverage(k: int) -> float:
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= confidence:
        k += 1
    return s[k - 1], s[n - k], coverage(k)


def ratio_summary(num: Sequence[float], den: Sequence[float], confidence: float = CONFIDENCE) -> dict:
    """A ratio over paired rounds: the ``median`` of the per-round ratios, the ``interval``
    [low, high] of :func:`median_interval`, its ``coverage``, the ``rounds`` and ``per_round``."""
    r = paired_ratios(num, den)
    low, high, cov = median_interval(r, confidence)
    return {"median": quantile(r, 0.5), "interval": [low, high], "coverage": cov, "rounds": len(r),
            "per_round": r}


def verdict(interval: Sequence[float], target: float, coverage: float = 1.0,
            confidence: float = CONFIDENCE) -> str:
    """Whether a goal "ratio ≥ target" holds: ``"met"`` when the interval lies at or above the
    target, ``"not met"`` when it lies below, ``"undecided"`` when it straddles the target or its
    ``coverage`` is under ``confidence`` (too few rounds to decide either way)."""
    low, high = interval
    if coverage < confidence or low < target <= high:
        return "undecided"
    return "met" if low >= target else "not met"


def judge(name: str, summary: dict, target: float, goal: str) -> dict:
    """One goal of a benchmark against the :func:`ratio_summary` of its ratio."""
    return {"ratio": name, "goal": goal, "target": target, "median": summary["median"],
            "interval": summary["interval"], "rounds": summary["rounds"], "coverage": summary["coverage"],
            "verdict": verdict(summary["interval"], target, summary["coverage"])}


def verdict_lines(verdicts: list[dict]) -> list[str]:
    return [f"{v['verdict']}: {v['goal']} — median {v['median']:.3f}, interval "
            f"[{v['interval'][0]:.3f}, {v['interval'][1]:.3f}], {v['rounds']} rounds "
            f"(coverage {v['coverage']:.3f})" for v in verdicts]


def with_spread(median: float, low: float, high: float) -> str:
    """A table cell: ``median (low–high)``."""
    return f"{_fmt(float(median))} ({_fmt(float(low))}–{_fmt(float(high))})"


def in_workdir(workdir: Path | None, prefix: str, run: Callable[[Path], dict]) -> dict:
    """``run(folder)`` in ``workdir`` (created if need be, kept for the next run to reuse) or, without one, in a
    temporary folder named ``prefix…`` that is removed after."""
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        return run(workdir.resolve())
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        return run(Path(tmp))

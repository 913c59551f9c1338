"""What the commands print about caches: ``inspect``'s summary, ``ls``'s table. Shared by the CLI and the demo."""

from __future__ import annotations

from storage_schemas.identity import SHORT


def format_ls(entries: list) -> str:
    if not entries:
        return "no caches"
    head = f"{'identity':<{SHORT + 2}}{'status':<10}{'teacher':<26}{'dataset':<28}{'views':>5}  {'size':>10}  " \
           f"{'created':<20}{'targets':<34}url"
    lines = [head]
    for e in entries:
        data = f"{(e.dataset_fingerprint or '-')[:8]} {e.num_samples}×{e.num_shards}tar" if e.identity else "-"
        lines.append(f"{(e.identity or '-')[:SHORT]:<{SHORT + 2}}{e.status:<10}{(e.teacher or '-')[:25]:<26}"
                     f"{data:<28}{e.num_views:>5}  {mb(e.bytes_total) if e.identity else '-':>10}  "
                     f"{(e.created or '-')[:19]:<20}{','.join(e.targets)[:33]:<34}{e.url}"
                     + (f"  ({e.problem})" if e.problem else ""))
    return "\n".join(lines)


def mb(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB" if n >= 1e3 else f"{n:.0f} B"


SHOW_SKIPPED = 10  # skipped samples listed by name in the text summary


def format_summary(s: dict, url: str) -> str:
    t = s["teacher"]
    top1 = "-" if t["top1"] is None else f"{t['top1']:.2f}%"
    lines = [
        f"cache      {url}",
        f"identity   {s.get('identity', '-')}",
        f"status     {s['status']} ({s['units']['complete']}/{s['units']['total']} units), schema {s['schema_version']}",
        f"teacher    {t['model']} @ {t['input_size']}px, {t['num_classes']} classes, "
        f"weights {t['weights_sha256'][:12]}…, {'drop-path on (train mode)' if t.get('stochastic_depth') else 'eval mode'}"
        f", top-1 on cached views {top1}",
        f"data       {s['num_samples']} samples in {s['num_shards']} shards × {s['num_views']} views, "
        f"{s['skipped']} skipped",
        f"size       {mb(s['bytes_total'])} in all, {mb(s['bytes_per_view'])} per view",
    ]
    if s.get("mix"):
        lines.insert(5, "mix        " + ", ".join(f"{k}={v}" for k, v in s["mix"].items())
                     + f" (views mixed in pairs within blocks of {s['mix']['window']} positions of a tar)")
    shown = s.get("skipped_samples", [])[:SHOW_SKIPPED]
    lines += [f"skipped    {k['tar']}: key {k['key']}: {k['reason']}" for k in shown]
    if s["skipped"] > len(shown):
        lines.append(f"skipped    … {s['skipped'] - len(shown)} more (inspect --json lists them all)")
    if s.get("samples_per_second"):
        lines.append(f"throughput {s['samples_per_second']:.1f} views/s")
    for h in s.get("history", []):
        added = f", +{len(h['shards_added'])} tar(s)" if h["shards_added"] else ""
        lines.append(f"history    {h['time']} {h['action']:<6} by {h['user']}: views {h['views'][0]}→{h['views'][1]}"
                     f"{added} → identity {h['identity'][:12]}")
    lines.append(f"{'target':<22}{'dtype':<48}{'per view':>12}{'cosine':>10}{'rel err':>10}")
    for name, tg in s["targets"].items():
        fid = tg.get("fidelity") or {}
        cos = f"{fid['cosine_mean']:.5f}" if fid else "-"
        rel = f"{fid['rel_err_mean']:.2e}" if fid else "-"
        per_view = mb(tg.get("bytes_per_view")) if name != "tpp" else mb(tg["bytes"]) + " once"
        dtype = str(tg["dtype"]) + (", no zstd" if tg.get("compression") == "none" else "")
        lines.append(f"{name:<22}{dtype:<48}{per_view:>12}{cos:>10}{rel:>10}")
    return "\n".join(lines)

"""A self-contained ``report.html`` (inline SVG charts, no scripts, no CDN)
rendered from the same dictionary that is written to ``report.json``."""

from __future__ import annotations

import html
from pathlib import Path

_CSS = """
body{font:15px/1.45 system-ui,sans-serif;margin:0 auto;max-width:980px;padding:1rem;color:#1d2433}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:2rem}table{border-collapse:collapse;width:100%;font-size:13px}
th,td{border-bottom:1px solid #dde;padding:3px 6px;text-align:right}th:first-child,td:first-child{text-align:left}
.kpi{display:flex;flex-wrap:wrap;gap:.6rem}.kpi div{background:#f3f5fa;border-radius:6px;padding:.5rem .8rem}
.kpi b{display:block;font-size:1.2rem}svg{max-width:100%;height:auto}.legend span{margin-right:1rem}
"""
BLUE, ORANGE = "#3b6fd8", "#e08a2e"


def _fmt(n: float | None) -> str:
    if n is None:
        return "–"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.4g}" if isinstance(n, float) else str(n)


def bar_chart(labels: list[str], series: list[tuple[str, list[float], str]], title: str) -> str:
    """Grouped horizontal bars, one row per label; values scaled to the max."""
    row_h, left, width = 18 * max(1, len(series)) + 6, 190, 560
    height = 30 + row_h * len(labels)
    top = max((v for _, values, _ in series for v in values), default=1) or 1
    parts = [f'<svg viewBox="0 0 {left + width + 80} {height}" role="img" aria-label="{html.escape(title)}">']
    for i, label in enumerate(labels):
        y = 20 + i * row_h
        parts.append(f'<text x="{left - 6}" y="{y + 13}" font-size="11" text-anchor="end">{html.escape(label[:30])}'
                     "</text>")
        for j, (_, values, color) in enumerate(series):
            v = values[i]
            w = max(1.0, width * v / top)
            yy = y + j * 18
            parts.append(f'<rect x="{left}" y="{yy}" width="{w:.1f}" height="14" fill="{color}"/>')
            parts.append(f'<text x="{left + w + 4:.1f}" y="{yy + 11}" font-size="10">{_fmt(v)}</text>')
    parts.append("</svg>")
    legend = "".join(f'<span style="color:{c}">■ {html.escape(name)}</span>' for name, _, c in series)
    return f'<div class="legend">{legend}</div>' + "".join(parts)


def line_chart(points: list[tuple[float, float]], title: str, x_label: str, y_label: str,
               reference: float | None = None) -> str:
    """Accuracy against MACs for a sweep; optional horizontal line for the original."""
    if not points:
        return ""
    w, h, pad = 600, 300, 50
    xs, ys = [p[0] for p in points], [p[1] for p in points] + ([reference] if reference is not None else [])
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def sx(x: float) -> float:
        return pad + (w - 2 * pad) * (x - x0) / (x1 - x0)

    def sy(y: float) -> float:
        return h - pad - (h - 2 * pad) * (y - y0) / (y1 - y0)

    pts = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in sorted(points))
    out = [f'<svg viewBox="0 0 {w} {h}" role="img" aria-label="{html.escape(title)}">',
           f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#888"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="#888"/>',
           f'<polyline points="{pts}" fill="none" stroke="{BLUE}" stroke-width="2"/>']
    for x, y in points:
        out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="4" fill="{BLUE}"><title>{_fmt(x)}: {y:.4g}'
                   "</title></circle>")
    if reference is not None:
        out.append(f'<line x1="{pad}" y1="{sy(reference):.1f}" x2="{w - pad}" y2="{sy(reference):.1f}" '
                   f'stroke="{ORANGE}" stroke-dasharray="5,4"/>')
    out += [f'<text x="{w / 2}" y="{h - 10}" font-size="12" text-anchor="middle">{html.escape(x_label)}</text>',
            f'<text x="14" y="{h / 2}" font-size="12" transform="rotate(-90 14 {h / 2})" text-anchor="middle">'
            f"{html.escape(y_label)}</text>",
            f'<text x="{pad}" y="{h - pad + 16}" font-size="10">{_fmt(x0)}</text>',
            f'<text x="{w - pad}" y="{h - pad + 16}" font-size="10" text-anchor="end">{_fmt(x1)}</text>',
            f'<text x="{pad - 4}" y="{h - pad}" font-size="10" text-anchor="end">{y0:.3g}</text>',
            f'<text x="{pad - 4}" y="{pad + 4}" font-size="10" text-anchor="end">{y1:.3g}</text>', "</svg>"]
    return "".join(out)


def render(report: dict) -> str:
    plan = report.get("plan", {})
    layers = plan.get("layers", [])
    names = [lp["name"] for lp in layers]
    kpis = [("MACs", f"{_fmt(report.get('macs_before'))} → {_fmt(report.get('macs_after'))}",
             f"{report.get('macs_ratio', 0):.2f}x fewer"),
            ("Parameters", f"{_fmt(report.get('params_before'))} → {_fmt(report.get('params_after'))}",
             f"{report.get('params_ratio', 0):.2f}x fewer"),
            ("Output deviation", f"{report.get('max_output_deviation', 0):.3g}", "relative, max")]
    ev = report.get("evaluation") or {}
    for key, label in (("top1", "Top-1"), ("agreement", "Agreement with original")):
        before, after = (ev.get("original") or {}).get(key), (ev.get("compressed") or {}).get(key)
        if after is not None:
            kpis.append((label, f"{_fmt(before)} → {_fmt(after)}" if before is not None else _fmt(after), ""))
    body = [f"<h1>TensorTrim report{(' — ' + html.escape(str(report['budget']))) if report.get('budget') else ''}"
            "</h1>",
            f"<p>Method: <b>{html.escape(str(plan.get('method', '–')))}</b>. {html.escape(plan.get('note') or '')}</p>",
            '<div class="kpi">' + "".join(f"<div>{k}<b>{v}</b>{s}</div>" for k, v, s in kpis) + "</div>"]
    if layers:
        body += ["<h2>Ranks per layer</h2>",
                 bar_chart(names, [("largest rank", [float(max(lp["ranks"])) for lp in layers], BLUE)], "ranks"),
                 "<h2>MACs per layer, before and after</h2>",
                 bar_chart(names, [("before", [float(lp["macs_before"]) for lp in layers], "#9aa7bd"),
                                   ("after", [float(lp["macs_after"]) for lp in layers], BLUE)], "MACs")]
    sweep = report.get("sweep") or []
    if sweep:
        pts = [(float(s["macs_after"]), float(s["accuracy"])) for s in sweep if s.get("accuracy") is not None]
        body += ["<h2>Accuracy vs MACs</h2>",
                 line_chart(pts, "accuracy vs MACs", "MACs", "accuracy", report.get("original_accuracy"))]
    rows = "".join(
        f"<tr><td>{html.escape(lp['name'])}</td><td>{lp['form']}</td><td>{'x'.join(map(str, lp['ranks']))}</td>"
        f"<td>{_fmt(lp['macs_before'])}</td><td>{_fmt(lp['macs_after'])}</td><td>{_fmt(lp['params_before'])}</td>"
        f"<td>{_fmt(lp['params_after'])}</td><td>{_fmt(lp.get('predicted_error'))}</td></tr>" for lp in layers)
    dense = "".join(f"<tr><td>{html.escape(k)}</td><td colspan=7>dense: {html.escape(v)}</td></tr>"
                    for k, v in plan.get("dense", {}).items())
    body += ["<h2>Layers</h2><table><tr><th>layer</th><th>form</th><th>ranks</th><th>MACs before</th>"
             "<th>MACs after</th><th>params before</th><th>params after</th><th>weight error</th></tr>"
             + rows + dense + "</table>"]
    files = report.get("files", {})
    if files:
        body.append("<h2>Files</h2><table><tr><th>file</th><th>export</th><th>size</th><th>sha256</th></tr>" + "".join(
            f"<tr><td>{html.escape(n)}</td><td>{f.get('method')}</td><td>{_fmt(f.get('size_bytes'))}B</td>"
            f"<td>{str(f.get('sha256', ''))[:16]}…</td></tr>" for n, f in files.items()) + "</table>")
    return ("<!doctype html><html lang=en><head><meta charset=utf-8><meta name=viewport "
            "content='width=device-width,initial-scale=1'><title>TensorTrim report</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>")


def write_html(report: dict, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(render(report), encoding="utf-8")
    return path

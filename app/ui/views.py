"""What the templates show: number formatting, job summaries and the inline SVG charts.

Charts are drawn here, server-side, as plain SVG (no script, no chart library): a
narrow viewBox with labels above the bars stays legible from a 360 px phone to a
laptop. Each chart has a text alternative (``<title>``/``<desc>``) and the pages
show the same numbers in a table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape
from typing import Any

from markupsafe import Markup

METHODS: list[tuple[str, str, str]] = [
    ("rene", "RENE", "Continuous search over mixed ranks, projected onto the exact budget. Best without data."),
    ("batude", "BATUDE", "Learns budget-aware ranks by training on your data (ADMM). Best with data; slowest."),
    ("energy", "Energy", "One global singular-value energy threshold, bisected to meet the budget."),
    ("vbmf", "VBMF", "Bayesian rank estimates per layer (Kim et al.), scaled down to meet the budget."),
    ("uniform", "Uniform", "The same rank ratio in every layer: simple and predictable baseline."),
    ("manual", "Manual", "Per-layer ranks you choose yourself, starting from half of every layer's ranks."),
]
STATUS_LABELS = {
    "queued": "Queued",
    "running": "Running",
    "cancelling": "Cancelling",
    "succeeded": "Done",
    "failed": "Failed",
    "cancelled": "Cancelled",
}
ACTIVE = frozenset({"queued", "running", "cancelling"})


def human(value: float | int | None, unit: str = "") -> str:
    """810000 -> '810 k', 1234567 -> '1.23 M'."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    v = float(value)
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g} {suffix}{unit}"
    return f"{v:.3g} {unit}".rstrip() if v != int(v) else f"{int(v)} {unit}".rstrip()


def ratio(before: float | None, after: float | None) -> str:
    if not before or not after:
        return "—"
    return f"{before / after:.2f}x"


def _top1(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, dict):
        for k in ("top1", "accuracy"):
            if isinstance(value.get(k), (int, float)):
                return float(value[k])
    return None


def accuracy_pair(metrics: dict[str, Any] | None) -> tuple[float | None, float | None]:
    """(top-1 before, after), from whichever shape the report used, or Nones."""
    m = metrics or {}
    acc = m.get("accuracy")
    if isinstance(acc, dict):
        before, after = _top1(acc.get("before")), _top1(acc.get("after"))
        if before is None and after is None:
            before, after = _top1(acc.get("top1_before")), _top1(acc.get("top1_after"))
        if before is not None or after is not None:
            return before, after
    return _top1(m.get("top1_before")), _top1(m.get("top1_after"))


def accuracy_change(metrics: dict[str, Any] | None) -> str:
    before, after = accuracy_pair(metrics)
    if before is None or after is None:
        return "—"
    return f"{(after - before) * 100:+.1f} pts"


def reduction(metrics: dict[str, Any] | None) -> str:
    m = metrics or {}
    r = m.get("macs_ratio")
    if not isinstance(r, (int, float)):
        b, a = m.get("macs_before"), m.get("macs_after")
        r = b / a if isinstance(b, (int, float)) and isinstance(a, (int, float)) and a else None
    return f"{r:.2f}x fewer MACs" if r else "—"


def metric_rows(metrics: dict[str, Any] | None) -> list[dict[str, str]]:
    """Before / after / change rows for the side-by-side table."""
    m = metrics or {}
    rows = []
    for label, key in (("MACs per sample", "macs"), ("Parameters", "params")):
        b, a = m.get(f"{key}_before"), m.get(f"{key}_after")
        if isinstance(b, (int, float)) and isinstance(a, (int, float)):
            rows.append({"label": label, "before": human(b), "after": human(a), "change": f"÷ {ratio(b, a)}"})
    before, after = accuracy_pair(m)
    if before is not None or after is not None:
        fmt = lambda v: "—" if v is None else f"{v * 100:.1f} %"  # noqa: E731
        rows.append({"label": "Top-1 accuracy", "before": fmt(before), "after": fmt(after),
                     "change": accuracy_change(m)})
    lat = m.get("latency")
    if isinstance(lat, dict) and isinstance(lat.get("before_ms"), (int, float)) and isinstance(
            lat.get("after_ms"), (int, float)):
        rows.append({"label": "Latency", "before": f"{lat['before_ms']:.3g} ms", "after": f"{lat['after_ms']:.3g} ms",
                     "change": f"÷ {ratio(lat['before_ms'], lat['after_ms'])}"})
    dev = m.get("max_output_deviation")
    if isinstance(dev, (int, float)):
        rows.append({"label": "Max output deviation", "before": "0", "after": f"{dev:.3g}", "change": "rel."})
    return rows


# --- charts --------------------------------------------------------------------------------

W = 360  # viewBox width: the chart is scaled to its container
PAD = 4


def _svg(height: float, title: str, desc: str, body: Sequence[str], cls: str) -> Markup:
    head = (f'<svg class="chart {cls}" viewBox="0 0 {W} {height:.0f}" role="img" '
            f'xmlns="http://www.w3.org/2000/svg" preserveAspectRatio="xMinYMin meet">'
            f"<title>{escape(title)}</title><desc>{escape(desc)}</desc>")
    return Markup(head + "".join(body) + "</svg>")


def _label_row(y: float, left: str, right: str) -> str:
    return (f'<text x="{PAD}" y="{y:.1f}" class="lbl">{escape(left)}</text>'
            f'<text x="{W - PAD}" y="{y:.1f}" class="val" text-anchor="end">{escape(right)}</text>')


def _short(name: str, n: int = 34) -> str:
    return name if len(name) <= n else "…" + name[-(n - 1):]


def ranks_chart(layers: Sequence[dict[str, Any]]) -> Markup | None:
    """One row per layer: the chosen rank(s) as bars (Tucker-2: input and output rank)."""
    if not layers:
        return None
    top = max((r for layer in layers for r in layer["ranks"]), default=1) or 1
    body, y = [], 0.0
    span = W - 2 * PAD
    for layer in layers:
        ranks = layer["ranks"]
        y += 13
        body.append(_label_row(y, _short(layer["layer"]), f"{layer['form']} · rank {', '.join(map(str, ranks))}"))
        y += 4
        for i, r in enumerate(ranks):
            w = max(span * r / top, 1.5)
            body.append(f'<rect x="{PAD}" y="{y:.1f}" width="{w:.1f}" height="7" rx="2" class="bar s{i % 2}">'
                        f"<title>{escape(layer['layer'])}: rank {r}</title></rect>")
            y += 9
        y += 4
    desc = "; ".join(f"{layer['layer']}: {layer['form']} rank {', '.join(map(str, layer['ranks']))}"
                     for layer in layers)
    return _svg(y + 2, "Chosen ranks per layer", desc, body, "ranks")


def macs_chart(layers: Sequence[dict[str, Any]]) -> Markup | None:
    """Per layer: MACs before (grey) and after (accent) on one shared scale."""
    if not layers:
        return None
    top = max(max(layer["macs_before"], layer["macs_after"]) for layer in layers) or 1
    span = W - 2 * PAD
    body, y = [], 0.0
    for layer in layers:
        b, a = layer["macs_before"], layer["macs_after"]
        y += 13
        body.append(_label_row(y, _short(layer["layer"]), f"{human(b)} → {human(a)} ({ratio(b, a)})"))
        y += 4
        for cls, v, what in (("before", b, "before"), ("after", a, "after")):
            body.append(f'<rect x="{PAD}" y="{y:.1f}" width="{max(span * v / top, 1.5):.1f}" height="7" rx="2" '
                        f'class="bar {cls}"><title>{escape(layer["layer"])}: {human(v)} MACs {what}</title></rect>')
            y += 9
        y += 4
    desc = "; ".join(f"{layer['layer']}: {layer['macs_before']} to {layer['macs_after']} MACs" for layer in layers)
    return _svg(y + 2, "MACs per layer, before and after", desc, body, "macs")


def sweep_points(metrics: dict[str, Any] | None) -> list[tuple[float, float]]:
    """A sweep's (MACs, accuracy) points: ``metrics['sweep']`` as a list of
    ``{"macs": .., "accuracy"|"top1": ..}`` objects or ``[macs, accuracy]`` pairs."""
    raw = (metrics or {}).get("sweep")
    if isinstance(raw, dict):
        raw = raw.get("points")
    points = []
    for p in raw if isinstance(raw, list) else []:
        if isinstance(p, dict):
            x, acc = p.get("macs", p.get("macs_after")), p.get("accuracy", p.get("top1"))
            acc = _top1(acc)
        elif isinstance(p, (list, tuple)) and len(p) == 2:
            x, acc = p
        else:
            continue
        if isinstance(x, (int, float)) and isinstance(acc, (int, float)):
            points.append((float(x), float(acc)))
    return sorted(points)


def sweep_label(metrics: dict[str, Any] | None) -> str:
    """What a sweep's y axis measures: held-out top-1 with a data set, otherwise how often
    the compressed model's top class agrees with the original's on random inputs."""
    raw = (metrics or {}).get("sweep")
    if isinstance(raw, list) and raw and all(isinstance(p, dict) and p.get("metric") == "agreement" for p in raw):
        return "Agreement with the original"
    return "Accuracy"


def sweep_rows(metrics: dict[str, Any] | None) -> list[dict[str, str]]:
    """The sweep as table rows, in the order the budgets were given."""
    raw = (metrics or {}).get("sweep")
    rows = []
    for p in raw if isinstance(raw, list) else []:
        if isinstance(p, dict) and isinstance(p.get("budget"), str):
            acc = _top1(p.get("accuracy"))
            ratio = p.get("macs_ratio")
            rows.append({"budget": p["budget"], "macs": human(p.get("macs_after")),
                         "ratio": f"{ratio:.2f}x" if isinstance(ratio, (int, float)) else "—",
                         "accuracy": f"{acc * 100:.1f} %" if acc is not None else "—"})
    return rows


def sweep_chart(points: Sequence[tuple[float, float]], label: str = "Accuracy") -> Markup | None:
    """``label`` (accuracy or agreement) against MACs, one point per budget of the sweep."""
    if len(points) < 2:
        return None
    h, left, right, top_pad, bottom = 220.0, 40.0, W - 10.0, 10.0, 190.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.05, y1 + 0.05
    if x1 - x0 < 1e-9:
        x0, x1 = x0 * 0.9, x1 * 1.1 + 1
    sx = lambda x: left + (right - left) * (x - x0) / (x1 - x0)  # noqa: E731
    sy = lambda v: bottom - (bottom - top_pad) * (v - y0) / (y1 - y0)  # noqa: E731
    body = [
        f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" class="axis"/>',
        f'<line x1="{left}" y1="{top_pad}" x2="{left}" y2="{bottom}" class="axis"/>',
        f'<text x="{left}" y="{bottom + 14}" class="val">{escape(human(x0))}</text>',
        f'<text x="{right}" y="{bottom + 14}" class="val" text-anchor="end">{escape(human(x1))}</text>',
        f'<text x="{(left + right) / 2}" y="{h - 4}" class="lbl" text-anchor="middle">MACs per sample</text>',
        f'<text x="{left - 4}" y="{bottom}" class="val" text-anchor="end">{y0 * 100:.0f}%</text>',
        f'<text x="{left - 4}" y="{top_pad + 8}" class="val" text-anchor="end">{y1 * 100:.0f}%</text>',
        '<polyline class="line" points="' + " ".join(f"{sx(x):.1f},{sy(v):.1f}" for x, v in points) + '"/>',
    ]
    body += [f'<circle cx="{sx(x):.1f}" cy="{sy(v):.1f}" r="3.5" class="dot"><title>{escape(human(x))} MACs: '
             f"{v * 100:.1f} %</title></circle>" for x, v in points]
    desc = "; ".join(f"{human(x)} MACs: {v * 100:.1f} %" for x, v in points)
    return _svg(h, f"{label} against MACs over the sweep", desc, body, "sweep")

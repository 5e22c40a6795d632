"""One self-contained HTML page with the figures and the plots of an evaluation (images embedded)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from wsr_med.files import atomic_write

__all__ = ["write_html_report"]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if v == v else "—"  # NaN: not defined on these cases
    if isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(x, float) for x in v):
        return f"{_fmt(v[0])} [{_fmt(v[1])}, {_fmt(v[2])}]"  # value [95% CI]
    return html.escape(str(v))


def _table(rows: dict) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_fmt(v)}</td></tr>" for k, v in rows.items()) + "</table>"


def write_html_report(metrics: dict, plots: list[Path], path: str | Path, title: str = "wsr_med evaluation",
                      provenance: dict | None = None) -> Path:
    """Write ``path``: what was evaluated (``provenance``: run, model, data, split, date, training settings),
    headline figures, per-class table with prevalence, and the plots as embedded PNGs: one self-contained file."""
    low, high = metrics["auc_ci95"]
    kind = metrics.get("auc_kind", "")
    headline = {"cases": metrics["n"], f"AUC ({kind})" if kind else "AUC": metrics["auc"],
                "AUC 95% CI": f"[{_fmt(low)}, {_fmt(high)}]", "accuracy": metrics["accuracy"],
                "balanced accuracy": metrics.get("balanced_accuracy", float("nan")), "ECE": metrics["ece"]}
    present = {c: m for c, m in metrics["per_class"].items() if m["support"]}
    if present:  # the class a model neglects is the first thing to see on imbalanced data
        weakest = min(present, key=lambda c: present[c]["sensitivity"])
        headline[f"lowest class sensitivity ({weakest})"] = present[weakest]["sensitivity"]
    if "sensitivity" in metrics:
        headline.update({"threshold": metrics["threshold"], "sensitivity": metrics["sensitivity"],
                         "specificity": metrics["specificity"], "PPV": metrics.get("ppv", float("nan")),
                         "NPV": metrics.get("npv", float("nan"))})
    rows = _table(headline)[len("<table>"):-len("</table>")]
    per_class = "".join(
        f"<tr><td>{html.escape(c)}</td><td>{_fmt(m['auc'])}</td><td>{_fmt(m['sensitivity'])}</td>"
        f"<td>{_fmt(m['specificity'])}</td><td>{_fmt(m.get('ppv', float('nan')))}</td><td>{m['support']}</td>"
        f"<td>{_fmt(100 * m.get('prevalence', float('nan')))}%</td></tr>"
        for c, m in metrics["per_class"].items()
    )
    described = "<h2>What was evaluated</h2>" + _table(provenance) if provenance else ""
    point = metrics.get("operating_point") or {}
    per_class_points = point.get("one_vs_rest_youden_on_these_cases")
    if per_class_points:
        point = {**{k: v for k, v in point.items() if k != "one_vs_rest_youden_on_these_cases"},
                 **{f"{c}: one-vs-rest Youden point on these cases (threshold, sensitivity, specificity)":
                    f"{_fmt(m['threshold'])}, {_fmt(m['sensitivity'])}, {_fmt(m['specificity'])}" for c, m in per_class_points.items()}}
    decision = ("<h2>Operating point (value [95% bootstrap CI])</h2>" + _table(point)) if point else ""
    calibration = metrics.get("calibration")
    if calibration:
        decision += "<h2>Calibration (temperature scaling; before → after, on these cases)</h2>" + _table({
            "temperature": calibration["temperature"], "fitted on": calibration["fitted_on"],
            "ECE": f"{_fmt(calibration['ece_before'])} → {_fmt(calibration['ece_after'])}",
            "Brier score": f"{_fmt(calibration['brier_before'])} → {_fmt(calibration['brier_after'])}",
            "NLL": f"{_fmt(calibration['nll_before'])} → {_fmt(calibration['nll_after'])}"})
    warnings = "".join(f'<p class="warning">{html.escape(w)}</p>' for w in metrics.get("warnings", []))
    images = "".join(
        f'<figure><img src="data:image/png;base64,{base64.b64encode(Path(p).read_bytes()).decode()}"/>'
        f"<figcaption>{html.escape(Path(p).stem)}</figcaption></figure>"
        for p in plots
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:left}}figure{{display:inline-block;margin:0 1em 1em 0}}
img{{max-width:480px}}.warning{{background:#fff3cd;border:1px solid #e0a800;padding:8px}}</style></head><body><h1>{html.escape(title)}</h1>
{warnings}<table>{rows}</table><h2>Per class (one vs rest)</h2>
<table><tr><th>class</th><th>AUC</th><th>sensitivity</th><th>specificity</th><th>PPV</th><th>cases</th><th>prevalence</th></tr>{per_class}</table>
{decision}
{described}
<h2>Plots</h2>{images}</body></html>"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, page)
    return path


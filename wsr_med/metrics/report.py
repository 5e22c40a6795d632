"""One self-contained HTML page with the figures and the plots of an evaluation (images embedded)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

__all__ = ["write_html_report"]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if v == v else "—"  # NaN: not defined on these cases
    return html.escape(str(v))


def write_html_report(metrics: dict, plots: list[Path], path: str | Path, title: str = "wsr_med evaluation") -> Path:
    """Write ``path``: headline figures, per-class table, confusion matrix and plots as embedded PNGs."""
    low, high = metrics["auc_ci95"]
    headline = {"cases": metrics["n"], "AUC": metrics["auc"], "AUC 95% CI": f"[{_fmt(low)}, {_fmt(high)}]",
                "accuracy": metrics["accuracy"], "ECE": metrics["ece"]}
    if "sensitivity" in metrics:
        headline.update({"threshold": metrics["threshold"], "sensitivity": metrics["sensitivity"],
                         "specificity": metrics["specificity"]})
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in headline.items())
    per_class = "".join(
        f"<tr><td>{html.escape(c)}</td><td>{_fmt(m['auc'])}</td><td>{_fmt(m['sensitivity'])}</td>"
        f"<td>{_fmt(m['specificity'])}</td><td>{m['support']}</td></tr>"
        for c, m in metrics["per_class"].items()
    )
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
<table><tr><th>class</th><th>AUC</th><th>sensitivity</th><th>specificity</th><th>cases</th></tr>{per_class}</table>
<h2>Plots</h2>{images}</body></html>"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path

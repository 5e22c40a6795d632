"""One self-contained HTML page with the figures and the plots of an evaluation (images embedded)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from wsr_med.files import atomic_write

__all__ = ["CAPTIONS", "write_html_report", "write_multilabel_report"]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if v == v else "—"  # NaN: not defined on these cases
    if isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(x, float) for x in v):
        return f"{_fmt(v[0])} [{_fmt(v[1])}, {_fmt(v[2])}]"  # value [95% CI]
    return html.escape(str(v))


def _percent(v: float) -> str:
    return f"{100 * v:.1f}%" if v == v else "—"


# What each figure shows, by file stem (a figure not named here is captioned by its file name).
CAPTIONS = {
    "roc": "ROC curve: sensitivity against 1 − specificity as the threshold moves (binary: for the positive class; "
           "otherwise each class against the rest); the dotted line is chance.",
    "confusion_matrix": "Confusion matrix at the run's operating point: rows are the true class, columns the predicted one.",
    "reliability": "Reliability after calibration: the accuracy of the cases in each confidence bin; "
                   "bars on the dotted line are well calibrated.",
    "reliability_uncalibrated": "Reliability before calibration (the network's raw softmax), for comparison.",
    "finding_rocs": "ROC curve of each finding on its labelled cases (uncertain labels left out when masked), best AUC "
                    "first; the dotted line is chance.",
    "finding_reliability": "Reliability of each finding's calibrated probability: per bin of predicted probability, the "
                           "share of cases that have the finding; bars on the dotted line are well calibrated.",
    "examples": "Example cases per true class: the most confident correct predictions (black), then the most "
                "confident wrong ones (red), with the probability of the predicted class.",
}


def _table(rows: dict) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_fmt(v)}</td></tr>" for k, v in rows.items()) + "</table>"


def _page(title: str, body: str) -> str:
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:left}}figure{{display:inline-block;margin:0 1em 1em 0}}
img{{max-width:480px}}figcaption{{max-width:480px;font-size:90%}}.warning{{background:#fff3cd;border:1px solid #e0a800;padding:8px}}</style></head><body><h1>{html.escape(title)}</h1>
{body}</body></html>"""


def _figures(plots: list[Path]) -> str:
    return "".join(
        f'<figure><img src="data:image/png;base64,{base64.b64encode(Path(p).read_bytes()).decode()}"/>'
        f"<figcaption>{html.escape(CAPTIONS.get(Path(p).stem, Path(p).stem))}</figcaption></figure>"
        for p in plots
    )


def _ci(values) -> str:
    value, low, high = values
    return f"{_fmt(value)} [{_fmt(low)}, {_fmt(high)}]"


def write_multilabel_report(metrics: dict, plots: list[Path], path: str | Path, title: str = "wsr_med evaluation",
                            provenance: dict | None = None) -> Path:
    """Write ``path`` for a multi-label evaluation (:func:`wsr_med.metrics.multilabel.multilabel_metrics`): macro and
    micro AUC, each named as such; one row per finding, best AUC first, with its operating point (threshold chosen on
    validation) and confidence intervals; the warnings; what was evaluated; the figures. One self-contained file."""
    low, high = metrics["macro_auc_ci95"]
    headline = {"cases": metrics["n"], "findings": len(metrics["findings"]),
                "macro AUC (mean of the findings' AUCs)": f"{_fmt(metrics['macro_auc'])} [{_fmt(low)}, {_fmt(high)}]",
                "micro AUC (every labelled finding of every case pooled)": metrics["micro_auc"]}
    rows = []
    for name in metrics["by_auc"]:
        m = metrics["per_finding"][name]
        point = [_ci(m[k]) if k in m else "—" for k in ("sensitivity", "specificity", "ppv", "npv")]
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{_ci([m['auc'], *m['auc_ci95']])}</td>"
                    f"<td>{_fmt(m['average_precision'])}</td><td>{_percent(m['prevalence'])}</td>"
                    f"<td>{m['positives']} / {m['n']}</td><td>{m['masked']}</td><td>{_fmt(m['threshold'])}</td>"
                    + "".join(f"<td>{v}</td>" for v in point) + "</tr>")
    point = metrics.get("operating_point") or {}
    chosen = (f"<p>Each finding is called present when its calibrated probability reaches its threshold, chosen by "
              f"<b>{html.escape(str(point.get('rule', '?')))}</b> on {html.escape(str(point.get('chosen_on', '?')))}; "
              "values are [95% bootstrap CI].</p>")
    body = ("".join(f'<p class="warning">{html.escape(w)}</p>' for w in metrics.get("warnings", []))
            + _table(headline)
            + "<h2>Per finding (best AUC first)</h2>" + chosen
            + "<table><tr><th>finding</th><th>AUC</th><th>average precision</th><th>prevalence</th><th>positives / labelled</th>"
              "<th>masked (uncertain)</th><th>threshold</th><th>sensitivity</th><th>specificity</th><th>PPV</th><th>NPV</th></tr>"
            + "".join(rows) + "</table>"
            + ("<h2>What was evaluated</h2>" + _table(provenance) if provenance else "")
            + "<h2>Plots</h2>" + _figures(plots))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, _page(title, body))
    return path


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
        positive = metrics.get("positive_class", metrics["classes"][-1])
        headline.update({"positive class": positive, f"threshold (on p {positive})": metrics["threshold"],
                         f"sensitivity for {positive}": metrics["sensitivity"],
                         f"specificity (not {positive})": metrics["specificity"],
                         f"PPV for {positive}": metrics.get("ppv", float("nan")),
                         f"NPV (not {positive})": metrics.get("npv", float("nan"))})
    rows = _table(headline)[len("<table>"):-len("</table>")]
    per_class = "".join(
        f"<tr><td>{html.escape(c)}</td><td>{_fmt(m['auc'])}</td><td>{_fmt(m['sensitivity'])}</td>"
        f"<td>{_fmt(m['specificity'])}</td><td>{_fmt(m.get('ppv', float('nan')))}</td><td>{m['support']}</td>"
        f"<td>{_percent(m.get('prevalence', float('nan')))}</td></tr>"
        for c, m in metrics["per_class"].items()
    )
    described = "<h2>What was evaluated</h2>" + _table(provenance) if provenance else ""
    point = metrics.get("operating_point") or {}
    per_class_points = point.get("one_vs_rest_youden_on_these_cases")
    if per_class_points:
        point = {**{k: v for k, v in point.items() if k != "one_vs_rest_youden_on_these_cases"},
                 **{f"{c}: one-vs-rest Youden point on these cases (threshold, sensitivity, specificity)":
                    f"{_fmt(m['threshold'])}, {_fmt(m['sensitivity'])}, {_fmt(m['specificity'])}" for c, m in per_class_points.items()}}
    title = "Operating point (value [95% bootstrap CI])"
    if "positive_class" in metrics:
        title += f"; positive: {html.escape(metrics['positive_class'])}"
    decision = (f"<h2>{title}</h2>" + _table(point)) if point else ""
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
        f"<figcaption>{html.escape(CAPTIONS.get(Path(p).stem, Path(p).stem))}</figcaption></figure>"
        for p in plots
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:left}}figure{{display:inline-block;margin:0 1em 1em 0}}
img{{max-width:480px}}figcaption{{max-width:480px;font-size:90%}}.warning{{background:#fff3cd;border:1px solid #e0a800;padding:8px}}</style></head><body><h1>{html.escape(title)}</h1>
{warnings}<table>{rows}</table><h2>Per class (one vs rest)</h2>
<table><tr><th>class</th><th>AUC</th><th>sensitivity</th><th>specificity</th><th>PPV</th><th>cases</th><th>prevalence</th></tr>{per_class}</table>
{decision}
{described}
<h2>Plots</h2>{images}</body></html>"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, page)
    return path


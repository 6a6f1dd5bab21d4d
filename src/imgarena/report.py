"""The comparison report: report.html (self-contained), report.md, results.csv, results.json.

Reads only the compare results and the models' run folders (metrics.jsonl, confusion_matrix.png);
it never imports the training engine or torch, so a report can be rebuilt from a copied folder.
Figures are drawn with matplotlib's Agg canvas through `imgarena.evaluation.plots`.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path

from imgarena.checkpoint import atomic_write, atomic_write_text

# One row per model in results.csv / results.json, in this order. compare.py fills them.
RESULT_FIELDS = [
    "model", "status", "reason", "epochs", "best_val_acc", "best_epoch", "final_val_acc",
    "best_val_loss", "final_val_loss", "best_val_top5", "train_time_s", "time_per_epoch_s", "train_img_s",
    "speed_vs_fastest", "speed_vs_baseline", "infer_img_s", "latency_p50_ms", "latency_p95_ms",
    "params", "flops", "peak_mem_mb", "run_dir", "key",
]

# (field, header) shown in the terminal, markdown and HTML tables.
TABLE_COLUMNS = [
    ("model", "model"), ("status", "status"), ("best_val_acc", "best val acc"), ("best_epoch", "best ep"),
    ("final_val_acc", "final val acc"), ("best_val_loss", "val loss"), ("best_val_top5", "top-5"),
    ("train_time_s", "train s"), ("time_per_epoch_s", "s/epoch"), ("train_img_s", "train img/s"),
    ("speed_vs_fastest", "vs fastest"), ("speed_vs_baseline", "vs baseline"), ("infer_img_s", "infer img/s (b64)"),
    ("latency_p50_ms", "p50 ms (b1)"), ("latency_p95_ms", "p95 ms (b1)"), ("params", "params"),
    ("flops", "FLOPs/img"), ("peak_mem_mb", "peak MB"), ("reason", "reason"),
]

FIGURES = "figures"


# ---------------------------------------------------------------- formatting

def _si(v: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.0f}"


def format_value(key: str, v) -> str:
    """A cell's text: percentages for accuracies, SI units for counts, ratios with an 'x'."""
    if v is None or v == "":
        return "-"
    if key in ("params", "flops"):
        return _si(float(v))
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if "acc" in key or key.endswith("top5"):
        return f"{100 * v:.1f}%"
    if key.startswith("speed_vs"):
        return f"{v:.2f}x" if v >= 0.1 else f"{v:.2g}x"
    if isinstance(v, int):
        return str(v)
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def _present_columns(rows, columns):
    # Drop columns no row fills (e.g. top-5 with <= 5 classes, baseline without --baseline).
    return [(k, h) for k, h in columns if any(r.get(k) not in (None, "") for r in rows)]


def format_table(rows: list[dict], columns, *, markdown: bool = False) -> str:
    """Plain-text (aligned) or markdown table of `rows` over the `(key, header)` columns."""
    cols = _present_columns(rows, columns)
    cells = [[format_value(k, r.get(k)) for k, _ in cols] for r in rows]
    heads = [h for _, h in cols]
    if markdown:
        esc = lambda s: s.replace("|", "\\|")  # noqa: E731
        lines = ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
        lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in cells]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(heads)]
    fmt = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(heads), fmt(["-" * w for w in widths]), *(fmt(row) for row in cells)])


def speed_sentence(model: str, ratio: float, other: str) -> str:
    """'a trains 1.31x faster than b' from a train-throughput ratio a/b."""
    if ratio >= 1:
        return f"{model} trains {ratio:.2f}x faster than {other}"
    return f"{model} trains {1 / ratio:.2f}x slower than {other}"


def headline(records: list[dict], baseline: str | None = None) -> str:
    """One line: who trains fastest (vs the baseline or the slowest) and who is most accurate."""
    ok = [r for r in records if r.get("status") == "ok"]
    parts = []
    timed = [r for r in ok if r.get("train_img_s")]
    if len(timed) >= 2:
        base = next((r for r in timed if r["model"] == baseline), None)
        if base is None:  # fastest vs slowest
            by_speed = sorted(timed, key=lambda r: -r["train_img_s"])
            fast, slow = by_speed[0], by_speed[-1]
        else:  # the fastest other model vs the baseline
            fast, slow = max((r for r in timed if r is not base), key=lambda r: r["train_img_s"]), base
        parts.append(speed_sentence(fast["model"], fast["train_img_s"] / slow["train_img_s"], slow["model"]))
    scored = sorted((r for r in ok if r.get("best_val_acc") is not None), key=lambda r: -r["best_val_acc"])
    if scored:
        best = scored[0]
        text = f"{best['model']} most accurate ({100 * best['best_val_acc']:.1f}% best val acc"
        if len(scored) > 1:
            gap = 100 * (best["best_val_acc"] - scored[1]["best_val_acc"])
            text += f", +{gap:.1f} pts over {scored[1]['model']}" if gap >= 0.05 else f", tied with {scored[1]['model']}"
        parts.append(text + ")")
    failed = [r["model"] for r in records if r.get("status") == "failed"]
    if failed:
        parts.append(f"failed: {', '.join(failed)}")
    return "; ".join(parts) if parts else "no model finished"


def baseline_sentences(records: list[dict], baseline: str | None) -> list[str]:
    base = next((r for r in records if r["model"] == baseline and r.get("train_img_s")), None)
    if base is None:
        return []
    return [speed_sentence(r["model"], r["train_img_s"] / base["train_img_s"], baseline)
            for r in records if r is not base and r.get("status") == "ok" and r.get("train_img_s")]


# ---------------------------------------------------------------- files

def write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_csv(path, rows: list[dict], fields: list[str] | None = None) -> None:
    fields = fields or list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if r.get(k) is None else r.get(k) for k in fields})
    atomic_write_text(path, buf.getvalue())


def read_history(run_dir) -> list[dict]:
    """metrics.jsonl rows of a run (an epoch per line); [] when the run wrote none."""
    p = Path(run_dir) / "metrics.jsonl"
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash: keep what is whole
                continue
    return rows


# ---------------------------------------------------------------- figures

def _color(i: int):
    from matplotlib import colormaps

    return colormaps["tab10"](i % 10)


def plot_overlaid_curves(histories: dict[str, list[dict]], path) -> None:
    """Val accuracy and loss of every model on shared axes, against epoch and against wall time."""
    from matplotlib.ticker import MaxNLocator

    from imgarena.evaluation.plots import new_figure, save_figure

    fig = new_figure(12, 8)
    panels = [("epoch", "val_acc"), ("epoch", "val_loss"), ("wall_time", "val_acc"), ("wall_time", "val_loss")]
    for n, (x_key, y_key) in enumerate(panels):
        ax = fig.add_subplot(2, 2, n + 1)
        for i, (name, hist) in enumerate(histories.items()):
            pts = [(r[x_key], r[y_key]) for r in hist if r.get(x_key) is not None and r.get(y_key) is not None]
            if pts:
                xs, ys = zip(*pts)
                if y_key == "val_acc":
                    ys = [100 * y for y in ys]
                ax.plot(xs, ys, "-o", markersize=3, color=_color(i), label=name)
        ax.set_xlabel("epoch" if x_key == "epoch" else "training wall time (s)")
        if x_key == "epoch":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("val accuracy (%)" if y_key == "val_acc" else "val loss")
        ax.grid(alpha=0.3)
        if n == 0:
            ax.legend(fontsize=8)
    fig.suptitle("Validation curves (same data, split and budget)")
    save_figure(fig, path)


def plot_acc_vs_time(records: list[dict], path) -> None:
    """Best val accuracy against training wall time: up and to the left is better."""
    from imgarena.evaluation.plots import new_figure, save_figure

    fig = new_figure(7, 5)
    ax = fig.add_subplot(1, 1, 1)
    for i, r in enumerate(records):
        if r.get("best_val_acc") is None or r.get("train_time_s") is None:
            continue
        ax.scatter([r["train_time_s"]], [100 * r["best_val_acc"]], s=60, color=_color(i), label=r["model"])
        ax.annotate(r["model"], (r["train_time_s"], 100 * r["best_val_acc"]), textcoords="offset points",
                    xytext=(5, 5), fontsize=8)
    times = [r["train_time_s"] for r in records if r.get("train_time_s")]
    if times and max(times) > 20 * min(times):  # models an order of magnitude apart: log scale
        ax.set_xscale("log")
    ax.set_xlabel("training wall time (s)")
    ax.set_ylabel("best val accuracy (%)")
    ax.set_title("Accuracy vs training time")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def _figures(compare_dir: Path, records: list[dict]) -> list[tuple[str, Path]]:
    """Draw the compare-level figures and collect each finished model's confusion matrix."""
    out = compare_dir / FIGURES
    out.mkdir(parents=True, exist_ok=True)
    figs = []
    histories = {r["model"]: read_history(compare_dir / r["run_dir"]) for r in records if r.get("run_dir")}
    histories = {k: v for k, v in histories.items() if v}
    if histories:
        plot_overlaid_curves(histories, out / "curves.png")
        figs.append(("Validation accuracy and loss vs epoch and vs wall time", out / "curves.png"))
    if any(r.get("best_val_acc") is not None for r in records):
        plot_acc_vs_time(records, out / "acc_vs_time.png")
        figs.append(("Best validation accuracy vs training time", out / "acc_vs_time.png"))
    return figs


def _confusion_images(compare_dir: Path, records: list[dict]) -> list[tuple[str, Path]]:
    found = []
    for r in records:
        if r.get("status") == "ok" and r.get("run_dir"):
            p = compare_dir / r["run_dir"] / "confusion_matrix.png"
            if p.is_file():
                found.append((r["model"], p))
    return found


# ---------------------------------------------------------------- report files

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em;color:#222;max-width:1400px}
h1{font-size:1.5em} .headline{font-size:1.1em;background:#f3f6fa;padding:.6em 1em;border-left:4px solid #4a7bd0}
table{border-collapse:collapse;font-size:.85em;margin:1em 0} .scroll{overflow-x:auto}
th,td{border:1px solid #ccc;padding:.3em .5em;text-align:right;white-space:nowrap}
th{background:#eef1f5} td:first-child,th:first-child,td:last-child{text-align:left} td:first-child{font-weight:600}
tr.failed td{color:#a33} tr.interrupted td,tr.pending td{color:#888} td.best{background:#e3f4e1;font-weight:600}
img{max-width:100%;border:1px solid #ddd;margin:.5em 0} .cms{display:flex;flex-wrap:wrap;gap:1em}
.cms figure{margin:0;max-width:680px} pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:.8em}
"""

# Sets body data-status="ok" once every image has decoded and no error event fired, so a headless
# browser (tests/test_report_browser.py) can check the rendered page, and shows a banner otherwise.
_CHECK_JS = """
window.__reportErrors = [];
window.addEventListener('error', function (e) {
  var t = e.target || {};
  window.__reportErrors.push(e.message || ('failed to load ' + (t.src || t.href || t.tagName)));
}, true);
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  var b = document.body;
  b.setAttribute('data-images', imgs.length);
  b.setAttribute('data-broken-images', broken.length);
  b.setAttribute('data-errors', window.__reportErrors.length);
  b.setAttribute('data-status', broken.length || window.__reportErrors.length ? 'error' : 'ok');
  if (b.getAttribute('data-status') !== 'ok') {
    var p = document.createElement('p');
    p.className = 'headline';
    p.textContent = 'This report did not render fully: ' + broken.length + ' broken image(s); ' +
      window.__reportErrors.join('; ');
    b.insertBefore(p, b.firstChild);
  }
});
"""


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _best_cells(records: list[dict]) -> dict[str, object]:
    """The winning value per column (highest accuracy/speed, lowest loss/latency/memory)."""
    ok = [r for r in records if r.get("status") == "ok"]
    best = {}
    for key, pick in (("best_val_acc", max), ("final_val_acc", max), ("best_val_top5", max), ("train_img_s", max),
                      ("infer_img_s", max), ("best_val_loss", min), ("latency_p50_ms", min),
                      ("latency_p95_ms", min), ("train_time_s", min), ("time_per_epoch_s", min),
                      ("peak_mem_mb", min)):
        vals = [r[key] for r in ok if r.get(key) is not None]
        if len(vals) > 1:
            best[key] = pick(vals)
    return best


def _html_table(records: list[dict]) -> str:
    cols = _present_columns(records, TABLE_COLUMNS)
    best = _best_cells(records)
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h in cols)
    body = []
    for r in records:
        cells = []
        for k, _ in cols:
            cls = ' class="best"' if k in best and r.get(k) == best[k] and r.get("status") == "ok" else ""
            cells.append(f"<td{cls}>{html.escape(format_value(k, r.get(k)))}</td>")
        body.append(f'<tr class="{html.escape(str(r.get("status", "")))}" data-model="{html.escape(r["model"])}">'
                    + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table id="results"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def render_html(results: dict, figs, cms) -> str:
    records = results["models"]
    cfg = results.get("config", {})
    esc = html.escape
    notes = "".join(f"<li>{esc(s)}</li>" for s in baseline_sentences(records, cfg.get("baseline")))
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>imgarena compare: {esc(', '.join(r['model'] for r in records))}</title>",
        f"<style>{_CSS}</style><script>{_CHECK_JS}</script></head><body>",
        f"<h1>imgarena compare &mdash; {esc(str(cfg.get('data', {}).get('source', '')))}</h1>",
        f"<p class='headline' id='headline'>{esc(results.get('headline', ''))}</p>",
        f"<p>{esc(results.get('conditions', ''))}</p>",
    ]
    if results.get("state") != "complete":
        parts.append(f"<p><b>Partial report</b> ({esc(results.get('state', ''))}): re-run the same command to "
                     "finish the remaining models; finished ones are skipped.</p>")
    parts.append("<h2>Results</h2>" + _html_table(records))
    if notes:
        parts.append(f"<ul>{notes}</ul>")
    parts.append("<p>Speeds: train img/s is the median over epochs of training throughput; inference img/s "
                 "(batch 64) and latency (batch 1, p50/p95) are measured on random inputs after training; "
                 "peak MB is weights plus what one training step allocates (see <code>imgarena bench</code>).</p>")
    for title, path in figs:
        parts.append(f"<h2>{esc(title)}</h2>{_img_tag(path, title)}")
    if cms:
        parts.append("<h2>Confusion matrices (validation, best checkpoint)</h2><div class='cms'>")
        parts += [f"<figure>{_img_tag(p, name + ' confusion matrix')}<figcaption>{esc(name)}</figcaption></figure>"
                  for name, p in cms]
        parts.append("</div>")
    parts.append(f"<h2>Configuration</h2><pre>{esc(json.dumps(cfg, indent=2, default=str))}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render_markdown(results: dict, compare_dir: Path, figs, cms) -> str:
    records = results["models"]
    cfg = results.get("config", {})
    lines = [f"# imgarena compare: {cfg.get('data', {}).get('source', '')}", "", f"**{results.get('headline', '')}**",
             "", results.get("conditions", ""), ""]
    if results.get("state") != "complete":
        lines += [f"_Partial report ({results.get('state')}): re-run the same command to finish._", ""]
    lines += [format_table(records, TABLE_COLUMNS, markdown=True), ""]
    lines += [f"- {s}" for s in baseline_sentences(records, cfg.get("baseline"))]
    lines.append("")
    for title, path in figs:
        lines += [f"## {title}", "", f"![{title}]({path.relative_to(compare_dir).as_posix()})", ""]
    if cms:
        lines += ["## Confusion matrices", ""]
        for name, p in cms:
            rel = Path(p).resolve().relative_to(compare_dir.resolve()).as_posix()
            lines += [f"### {name}", "", f"![{name}]({rel})", ""]
    return "\n".join(lines)


def write_report(compare_dir, results: dict) -> Path:
    """Write results.json, results.csv, report.md and report.html into `compare_dir`; returns report.html.

    `results` = {"config": ..., "models": [record per RESULT_FIELDS], "state": complete|interrupted|...,
    "headline": ..., "conditions": ...}. Each file is replaced atomically, so an interrupted write
    leaves the previous complete version.
    """
    compare_dir = Path(compare_dir)
    records = results["models"]
    results = {**results, "headline": results.get("headline") or headline(records, results.get("config", {}).get("baseline"))}
    write_json(compare_dir / "results.json", results)
    write_csv(compare_dir / "results.csv", records, RESULT_FIELDS)
    figs = _figures(compare_dir, records)
    cms = _confusion_images(compare_dir, records)
    atomic_write_text(compare_dir / "report.md", render_markdown(results, compare_dir, figs, cms))
    page = render_html(results, figs, cms)
    atomic_write(compare_dir / "report.html", lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    return compare_dir / "report.html"

"""The comparison report: report.html (self-contained), report.md, results.csv (one row per run),
models.csv (per model: mean, std, 95% CI), pairwise.csv (every pair's difference, CI, p), results.json.

The page: headline verdict, mean ± CI table with the rules that made it, pairwise matrix, per-class
F1 side by side, the images the top two models disagree on, runs as dots, curves, confusion
matrices, every run, optional extra sections (`ReportSection`), configuration.

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
from dataclasses import dataclass
from pathlib import Path

from imgarena.checkpoint import atomic_write, atomic_write_text

# One row per run in results.csv (and results.json "runs"), in this order. comparison.py fills them.
RUN_FIELDS = [
    "model", "seed", "fold", "repeat", "status", "reason", "rank_acc", "rank_split", "n_eval", "test_acc",
    "epochs", "epochs_trained", "best_val_acc", "best_epoch", "final_val_acc", "best_val_loss", "final_val_loss",
    "best_val_top5", "train_time_s", "time_per_epoch_s", "train_img_s", "infer_img_s", "latency_p50_ms",
    "latency_p95_ms", "params", "flops", "peak_mem_mb", "undertrained", "undertrained_reason", "needed_epochs",
    "needed_s", "run_dir", "key", "temperature", "ece_before", "ece_after", "finetune", "pretrained",
    "pretrained_kind", "pretrained_name", "pretrained_sha256",
]
RESULT_FIELDS = RUN_FIELDS  # the name older callers use
# One row per model in models.csv (and results.json "models").
MODEL_FIELDS = [
    "model", "status", "runs", "runs_planned", "rank_split", "n_eval", "acc_mean", "acc_std", "acc_lo", "acc_hi",
    "acc_ci", "best_val_acc", "final_val_acc", "test_acc", "epochs_trained", "undertrained", "undertrained_reason",
    "needed_epochs", "needed_s", "train_time_s", "time_per_epoch_s", "train_img_s", "train_img_s_std",
    "speed_vs_fastest", "speed_vs_baseline", "infer_img_s", "latency_p50_ms", "latency_p95_ms", "params", "flops",
    "peak_mem_mb", "reason", "run_dir", "temperature", "ece_before", "ece_after", "finetune", "pretrained",
    "pretrained_kind", "pretrained_name", "pretrained_sha256",
]
PAIR_FIELDS = ["a", "b", "diff", "lo", "hi", "p", "p_holm", "significant", "method", "n_runs", "n_images", "only_a",
               "only_b", "speed_ratio", "speed_lo", "speed_hi", "speed_p"]

# (field, header) of the per-model table (terminal, markdown, HTML). acc_text / ci_text /
# flag_text are filled by _display_rows from the numeric fields; finetune_text / weights_text only
# when some model starts from pretrained weights.
TABLE_COLUMNS = [
    ("model", "model"), ("status", "status"), ("runs", "runs"), ("finetune_text", "fine-tune"),
    ("weights_text", "weights"), ("acc_text", "ranked acc, mean ± std"),
    ("ci_text", "95% CI"), ("best_val_acc", "best val acc (optimistic)"), ("final_val_acc", "final val acc"),
    ("epochs_trained", "epochs"), ("flag_text", "undertrained"), ("best_val_loss", "val loss"),
    ("best_val_top5", "top-5"), ("train_time_s", "train s"), ("time_per_epoch_s", "s/epoch"),
    ("speed_text", "train img/s"), ("speed_vs_fastest", "vs fastest"), ("speed_vs_baseline", "vs baseline"),
    ("infer_img_s", "infer img/s (b64)"), ("latency_p50_ms", "p50 ms (b1)"), ("latency_p95_ms", "p95 ms (b1)"),
    ("params", "params"), ("flops", "FLOPs/img"), ("peak_mem_mb", "peak MB"),
    ("ece_text", "ECE before → after (val)"), ("reason", "reason"),
]
TERMINAL_COLUMNS = [c for c in TABLE_COLUMNS if c[0] not in ("best_val_loss", "latency_p95_ms", "best_val_top5",
                                                             "final_val_acc", "ece_text")]
RUN_COLUMNS = [
    ("model", "model"), ("seed", "seed"), ("fold", "fold"), ("repeat", "repeat"), ("status", "status"),
    ("finetune_text", "fine-tune"), ("weights_text", "weights"), ("rank_acc", "ranked acc"), ("best_val_acc", "best val acc (optimistic)"), ("final_val_acc", "final val acc"),
    ("epochs_trained", "epochs"), ("undertrained", "undertrained"), ("train_time_s", "train s"),
    ("train_img_s", "train img/s"), ("run_dir", "run folder"), ("reason", "reason"),
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


def format_p(p) -> str:
    if p is None:
        return "no test possible"
    return "p < 0.0001" if p < 1e-4 else f"p = {p:.2g}"


def _pts(v) -> str:
    return f"{100 * v:+.1f}"


def oriented_pair(pairs: list[dict], a: str, b: str) -> dict | None:
    """The pair record for a vs b, flipped when it was stored as b vs a (diff and intervals negated,
    speed ratio inverted)."""
    for p in pairs:
        if (p["a"], p["b"]) == (a, b):
            return p
        if (p["a"], p["b"]) == (b, a):
            q = dict(p, a=a, b=b, only_a=p.get("only_b"), only_b=p.get("only_a"))
            for k in ("diff", "lo", "hi"):
                q[k] = None if p.get(k) is None else -p[k]
            q["lo"], q["hi"] = q["hi"], q["lo"]
            q["better"] = {"a": "b", "b": "a"}.get(p.get("better"))
            inv = lambda v: None if not v else 1 / v  # noqa: E731
            q["speed_ratio"], q["speed_lo"], q["speed_hi"] = inv(p.get("speed_ratio")), inv(p.get("speed_hi")), inv(p.get("speed_lo"))
            return q
    return None


def accuracy_sentence(pair: dict) -> str:
    """"A is more accurate than B: +X points [lo, hi], p = ..." or "A and B cannot be told apart"."""
    a, b = pair["a"], pair["b"]
    if pair.get("significant") and pair["diff"] < 0:  # b is the more accurate one: say it that way round
        return accuracy_sentence(oriented_pair([pair], b, a))
    n_img = f"{pair['n_images']} images" if pair.get("n_images") else f"{pair.get('n_runs')} matched runs"
    if pair.get("significant") and pair["diff"] > 0:
        ci = f" [{_pts(pair['lo'])}, {_pts(pair['hi'])}]" if pair.get("lo") is not None else ""
        return f"{a} is more accurate than {b}: {_pts(pair['diff'])} points{ci}, {format_p(pair['p'])}"
    return (f"{a} and {b} cannot be told apart on this data ({_pts(pair['diff'] or 0)} points, "
            f"{format_p(pair.get('p'))}; {n_img})")


def speed_claim(pair: dict) -> str | None:
    """Train-speed sentence for a vs b with the run-to-run interval of the ratio."""
    r = pair.get("speed_ratio")
    if not r:
        return None
    lo, hi = pair.get("speed_lo"), pair.get("speed_hi")
    if lo is None:
        return speed_sentence(pair["a"], r, pair["b"]) + " (one measurement each: no spread to judge by)"
    if lo <= 1 <= hi:
        return f"{pair['a']} and {pair['b']} train at the same speed within the run-to-run spread ({r:.2f}x [{lo:.2f}, {hi:.2f}])"
    return speed_sentence(pair["a"], r, pair["b"]) + f" [{lo:.2f}x, {hi:.2f}x]"


def undertrained_text(row: dict) -> str:
    need = f"; needs ~{row['needed_s']:.0f}s" if row.get("needed_s") else (
        f"; needs ~{row['needed_epochs']:.0f} epochs" if row.get("needed_epochs") else "")
    return f"{row['model']} ({row.get('undertrained_reason') or 'undertrained'}{need})"


def headline(models: list[dict], pairs: list[dict] | None = None, baseline: str | None = None) -> str:
    """The verdict: the top model against the runner-up (with its test), train speed (fastest vs
    the baseline or the slowest, with its spread), undertrained and failed models."""
    pairs = pairs or []
    done = [m for m in models if m.get("runs")]
    parts = []
    ranked = sorted((m for m in done if m.get("acc_mean") is not None), key=lambda m: -m["acc_mean"])
    if len(ranked) >= 2:
        pair = oriented_pair(pairs, ranked[0]["model"], ranked[1]["model"])
        if pair is not None:
            parts.append(accuracy_sentence(pair))
    elif ranked:
        parts.append(f"{ranked[0]['model']}: {100 * ranked[0]['acc_mean']:.1f}% (only model that finished)")
    timed = [m for m in done if m.get("train_img_s")]
    if len(timed) >= 2:
        base = next((m for m in timed if m["model"] == baseline), None)
        if base is None:
            by_speed = sorted(timed, key=lambda m: -m["train_img_s"])
            fast, slow = by_speed[0], by_speed[-1]
        else:
            fast, slow = max((m for m in timed if m is not base), key=lambda m: m["train_img_s"]), base
        pair = oriented_pair(pairs, fast["model"], slow["model"])
        claim = speed_claim(pair) if pair else None
        parts.append(claim or speed_sentence(fast["model"], fast["train_img_s"] / slow["train_img_s"], slow["model"]))
    under = [undertrained_text(m) for m in done if m.get("undertrained")]
    if under:
        parts.append("undertrained, so its accuracy understates it: " + ", ".join(under))
    failed = [m["model"] for m in models if m.get("status") == "failed"]
    if failed:
        parts.append(f"failed: {', '.join(failed)}")
    return "; ".join(parts) if parts else "no model finished"


def baseline_sentences(records: list[dict], baseline: str | None, pairs: list[dict] | None = None) -> list[str]:
    """Each model against --baseline: its accuracy verdict (with `pairs`) and its train speed."""
    base = next((r for r in records if r["model"] == baseline and r.get("train_img_s")), None)
    if base is None:
        return []
    out = []
    for r in records:
        if r is base or not r.get("train_img_s") or not (r.get("runs") or r.get("status") == "ok"):
            continue
        pair = oriented_pair(pairs or [], r["model"], baseline)
        speed = speed_sentence(r["model"], r["train_img_s"] / base["train_img_s"], baseline)
        out.append(f"{accuracy_sentence(pair)}; {speed}" if pair is not None and pair.get("diff") is not None
                   else speed)
    return out


def transfer_shown(rows: list[dict]) -> bool:
    """Whether the fine-tune and weights columns say anything: some row used pretrained weights or a
    mode other than training everything from scratch."""
    return any(r.get("pretrained") or r.get("finetune") not in (None, "full") for r in rows)


def weights_text(row: dict) -> str:
    """'timm (mixer_b16_224.miil_in21k)', 'runs/cnn_s-1 (run, sha256 1a2b3c4d)', or 'random init'."""
    if not row.get("pretrained"):
        return "random init"
    source, kind, name = str(row["pretrained"]), row.get("pretrained_kind"), row.get("pretrained_name")
    about = [kind if kind and source != kind and not source.startswith(f"{kind}:") else None,
             name if kind == "timm" and name and name not in source else None,
             f"sha256 {row['pretrained_sha256'][:8]}" if row.get("pretrained_sha256") else None]
    about = [x for x in about if x]
    return source + (f" ({', '.join(about)})" if about else "")


def _with_transfer(rows: list[dict]) -> list[dict]:
    if transfer_shown(rows):
        for r in rows:
            r["finetune_text"] = r.get("finetune") or "-"
            r["weights_text"] = weights_text(r)
    return rows


def display_rows(models: list[dict]) -> list[dict]:
    """Model rows, ranked (best mean first, unfinished last), with the text cells of TABLE_COLUMNS."""
    models = _ranked(models) + [m for m in models if m.get("acc_mean") is None]
    rows = []
    for m in models:
        r = dict(m)
        if m.get("acc_mean") is not None:
            sd = f" ± {100 * m['acc_std']:.1f}" if m.get("acc_std") is not None else ""
            r["acc_text"] = f"{100 * m['acc_mean']:.1f}%{sd}"
        if m.get("acc_lo") is not None:
            r["ci_text"] = f"[{100 * m['acc_lo']:.1f}, {100 * m['acc_hi']:.1f}]"
        if m.get("runs"):
            r["flag_text"] = ("UNDERTRAINED: " + undertrained_text(m).split(" (", 1)[1][:-1]) if m.get("undertrained") else "no"
        if m.get("train_img_s"):
            sd = f" ± {m['train_img_s_std']:,.0f}" if m.get("train_img_s_std") else ""
            r["speed_text"] = f"{m['train_img_s']:,.0f}{sd}"
        if m.get("ece_before") is not None and m.get("ece_after") is not None:
            r["ece_text"] = f"{m['ece_before']:.3f} → {m['ece_after']:.3f}"
        rows.append(r)
    return _with_transfer(rows)


def explanation(results: dict) -> list[str]:
    """How the numbers were made, in sentences (the report states its rules)."""
    cfg = results.get("config", {})
    n_runs = max((m.get("runs_planned") or 1 for m in results.get("models", [])), default=1)
    lines = [results.get("rule", ""),
             "Best val acc is the best epoch's validation accuracy: optimistic, because that epoch was "
             "chosen on those same images; it is shown, not ranked on.",
             ("95% CI: a Student-t interval of the ranked accuracy across a model's runs (retraining noise)."
              if n_runs > 1 else
              "95% CI: the Wilson interval of the ranked accuracy over its images (one run per model: "
              "image noise only; add --seeds N to measure retraining noise)."),
             ("Pairs: McNemar's exact test on per-image correctness (same images, one run each)." if n_runs == 1 else
              "Pairs: two tests, both must agree (the p-value is the larger, the interval spans both): a paired "
              "t-test of matched runs (same seed and split; retraining noise) and a paired t-test over images of "
              "each model's per-image correctness averaged over its runs (image noise; each image counted once, "
              "not once per seed as pooling McNemar over runs would)."),
             "p-values are per pair; the pairwise list also gives Holm-adjusted ones for the whole family of pairs.",
             "Undertrained: less than one epoch trained, or the val accuracy of the last third of the epochs rose by "
             "more than the noise (2 x sqrt(2) x the binomial SE of the final val accuracy); the budget it needs "
             "extrapolates a saturating fit of its val curve.",
             "Speed: train img/s is the median over epochs of training throughput, mean ± std over runs; speed "
             "claims compare runs with Welch's t-test on log throughput (one run: its epochs)."]
    if cfg.get("baseline"):
        lines.append(f"vs baseline: train throughput relative to {cfg['baseline']}.")
    if transfer_shown(results.get("models", [])):
        lines.append("Fine-tune: full trains every weight; linear trains only the head on a frozen backbone; two-stage "
                     "trains the head first (freeze epochs), then everything with a lower backbone lr. Weights: what "
                     "each model started from (the source as given, its kind and the file's sha256 where known); "
                     "each model's inputs use the preprocessing its weights were trained with.")
    return [line for line in lines if line]


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


def plot_overlaid_curves(histories: dict[str, list[list[dict]]], path) -> None:
    """Val accuracy and loss of every run on shared axes (one colour per model), against epoch and
    against wall time."""
    from matplotlib.ticker import MaxNLocator

    from imgarena.evaluation.plots import new_figure, save_figure

    fig = new_figure(12, 8)
    panels = [("epoch", "val_acc"), ("epoch", "val_loss"), ("wall_time", "val_acc"), ("wall_time", "val_loss")]
    for n, (x_key, y_key) in enumerate(panels):
        ax = fig.add_subplot(2, 2, n + 1)
        for i, (name, hists) in enumerate(histories.items()):
            for j, hist in enumerate(hists):
                pts = [(r[x_key], r[y_key]) for r in hist if r.get(x_key) is not None and r.get(y_key) is not None]
                if pts:
                    xs, ys = zip(*pts)
                    if y_key == "val_acc":
                        ys = [100 * y for y in ys]
                    ax.plot(xs, ys, "-o", markersize=3, color=_color(i), alpha=1.0 if j == 0 else 0.45,
                            label=name if j == 0 else None)
        ax.set_xlabel("epoch" if x_key == "epoch" else "training wall time (s)")
        if x_key == "epoch":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("val accuracy (%)" if y_key == "val_acc" else "val loss")
        ax.grid(alpha=0.3)
        if n == 0:
            ax.legend(fontsize=8)
    fig.suptitle("Validation curves, every run (same data, split and budget)")
    save_figure(fig, path)


def plot_acc_vs_time(models: list[dict], path) -> None:
    """Ranked accuracy (mean, 95% CI) against training wall time: up and to the left is better."""
    from imgarena.evaluation.plots import new_figure, save_figure

    fig = new_figure(7, 5)
    ax = fig.add_subplot(1, 1, 1)
    for i, m in enumerate(models):
        if m.get("acc_mean") is None or m.get("train_time_s") is None:
            continue
        y = 100 * m["acc_mean"]
        err = None
        if m.get("acc_lo") is not None:
            err = [[y - 100 * m["acc_lo"]], [100 * m["acc_hi"] - y]]
        ax.errorbar([m["train_time_s"]], [y], yerr=err, fmt="o", markersize=7, capsize=3, color=_color(i))
        ax.annotate(m["model"], (m["train_time_s"], y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    times = [m["train_time_s"] for m in models if m.get("train_time_s")]
    if times and max(times) > 20 * min(times):  # models an order of magnitude apart: log scale
        ax.set_xscale("log")
    ax.set_xlabel("training wall time per run (s)")
    ax.set_ylabel("ranked accuracy (%), mean and 95% CI")
    ax.set_title("Accuracy vs training time")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_runs(models: list[dict], runs: list[dict], path) -> None:
    """Every run's ranked accuracy as a dot, with each model's mean and 95% CI beside them."""
    import numpy as np

    from imgarena.evaluation.plots import new_figure, save_figure

    shown = [m for m in models if m.get("acc_mean") is not None]
    fig = new_figure(max(5, 1.3 * len(shown) + 2), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    for i, m in enumerate(shown):
        ys = [100 * r["rank_acc"] for r in runs if r["model"] == m["model"] and r.get("status") == "ok"
              and r.get("rank_acc") is not None]
        xs = i - 0.12 + 0.08 * (np.arange(len(ys)) - (len(ys) - 1) / 2) / max(len(ys), 1)
        ax.scatter(xs, ys, s=22, color=_color(i), alpha=0.8, zorder=3)
        y = 100 * m["acc_mean"]
        if m.get("acc_lo") is not None:
            ax.errorbar([i + 0.12], [y], yerr=[[y - 100 * m["acc_lo"]], [100 * m["acc_hi"] - y]], fmt="s",
                        color=_color(i), capsize=4, markersize=6, zorder=3)
        else:
            ax.scatter([i + 0.12], [y], marker="s", color=_color(i), zorder=3)
    ax.set_xticks(range(len(shown)))
    ax.set_xticklabels([m["model"] for m in shown], rotation=20, ha="right")
    ax.set_ylabel("ranked accuracy (%)")
    ax.set_title("Runs (dots) and mean with 95% CI (squares)")
    ax.grid(alpha=0.3, axis="y")
    save_figure(fig, path)


def plot_disagreements(dis: dict, class_names: list[str], path) -> bool:
    """Two mosaics: images right for a and wrong for b, and the reverse, with the true label and the
    other model's prediction. False when there is nothing to draw."""
    import numpy as np

    from imgarena.evaluation.plots import _to_display, new_figure, save_figure

    groups = [(dis["a"], dis["b"], [x for x in dis["only_a"] if x.get("image") is not None], "pred_b"),
              (dis["b"], dis["a"], [x for x in dis["only_b"] if x.get("image") is not None], "pred_a")]
    if not any(g[2] for g in groups):
        return False
    cols = 12
    fig = new_figure(cols * 1.15, 2 * 1.9)
    names = [str(c) for c in class_names]
    for row, (right, wrong, items, key) in enumerate(groups):
        ax = fig.add_axes((0, 0.5 * (1 - row), 1, 0.42))
        ax.axis("off")
        ax.set_title(f"right for {right}, wrong for {wrong} ({len(dis['only_a' if row == 0 else 'only_b'])} images)",
                     fontsize=9, loc="left")
        if not items:
            continue
        first, cmap = _to_display(items[0]["image"])
        h, w = first.shape[:2]
        gap = max(w // 6, 2)
        mosaic = np.full((h, cols * (w + gap)) + first.shape[2:], 255, dtype=np.uint8)
        for k, it in enumerate(items[:cols]):
            img, _ = _to_display(it["image"])
            mosaic[:, k * (w + gap):k * (w + gap) + w] = img
            ax.text(k * (w + gap) + w / 2, h + 1, f"{names[it['target']][:10]}\n{wrong}: {names[it[key]][:10]}",
                    ha="center", va="top", fontsize=6, color="firebrick")
        ax.imshow(mosaic, cmap=cmap, vmin=0, vmax=255, interpolation="nearest")
    save_figure(fig, path)
    return True


def _run_histories(compare_dir: Path, models: list[dict]) -> dict[str, list[list[dict]]]:
    out = {}
    for m in models:
        hists = [read_history(compare_dir / d) for d in m.get("run_dirs") or ([m["run_dir"]] if m.get("run_dir") else [])]
        hists = [h for h in hists if h]
        if hists:
            out[m["model"]] = hists
    return out


def _figures(compare_dir: Path, results: dict, disagreement: dict | None) -> list[tuple[str, Path]]:
    """Draw the compare-level figures; returns (title, path) of each."""
    out = compare_dir / FIGURES
    out.mkdir(parents=True, exist_ok=True)
    models, runs = results["models"], results.get("runs", [])
    figs = []
    if any(m.get("acc_mean") is not None for m in models):
        plot_runs(models, runs, out / "runs.png")
        figs.append(("Ranked accuracy of every run, with each model's mean and 95% CI", out / "runs.png"))
    histories = _run_histories(compare_dir, models)
    if histories:
        plot_overlaid_curves(histories, out / "curves.png")
        figs.append(("Validation accuracy and loss vs epoch and vs wall time", out / "curves.png"))
    if any(m.get("acc_mean") is not None and m.get("train_time_s") is not None for m in models):
        plot_acc_vs_time(models, out / "acc_vs_time.png")
        figs.append(("Ranked accuracy vs training time", out / "acc_vs_time.png"))
    return figs


def _confusion_images(compare_dir: Path, models: list[dict]) -> list[tuple[str, Path]]:
    found = []
    for m in models:
        if m.get("runs") and m.get("run_dir"):
            p = compare_dir / m["run_dir"] / "confusion_matrix.png"
            if p.is_file():
                found.append((m["model"], p))
    return found


# ---------------------------------------------------------------- report files

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em;color:#222;max-width:1400px}
h1{font-size:1.5em} .headline{font-size:1.1em;background:#f3f6fa;padding:.6em 1em;border-left:4px solid #4a7bd0}
table{border-collapse:collapse;font-size:.85em;margin:1em 0} .scroll{overflow-x:auto}
th,td{border:1px solid #ccc;padding:.3em .5em;text-align:right;white-space:nowrap}
th{background:#eef1f5} td:first-child,th:first-child,td:last-child{text-align:left} td:first-child{font-weight:600}
tr.failed td{color:#a33} td.flag{color:#a33;font-weight:600} td.win{background:#e3f4e1} td.loss{background:#f8e1e1} td.tie{color:#666} tr.interrupted td,tr.pending td{color:#888} td.best{background:#e3f4e1;font-weight:600}
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


@dataclass
class ReportSection:
    """An extra report section (e.g. side-by-side explanations): a title and its body as HTML and
    as markdown, inserted just before the configuration section. Images in `html` must be inline
    (data: URIs) so the report stays one self-contained file."""

    title: str
    html: str
    markdown: str


def explain_report_section(png: Path) -> ReportSection:
    """The side-by-side explanation figure (imgarena.explain.explain_grid_for_report) as a section."""
    title = "Where each model looks"
    note = ("The same validation images (rows: some every model gets right, some they disagree on), each "
            "model's class-activation map for its own prediction (columns); `imgarena explain` draws them "
            "for any image.")
    return ReportSection(title, f"<p>{html.escape(note)}</p>{_img_tag(png, title)}",
                         f"{note}\n\n![{title}](figures/{png.name})\n")


def reliability_section(compare_dir: Path, models: list[dict]) -> ReportSection | None:
    """Each model's reliability diagram (val, first run; imgarena.calibration), when its run drew one."""
    found = []
    for m in models:
        if m.get("runs") and m.get("run_dir"):
            p = compare_dir / m["run_dir"] / "reliability.png"
            if p.is_file():
                found.append((m["model"], p))
    if not found:
        return None
    note = ("Accuracy against confidence on the validation split, before and after the temperature scaling fitted "
            "at the end of training (predict, serve and the API return the calibrated probabilities).")
    body = "".join(f"<figure>{_img_tag(p, name + ' reliability')}<figcaption>{html.escape(name)}</figcaption></figure>"
                   for name, p in found)
    md = "\n\n".join(f"### {name}\n\n![{name}]({p.resolve().relative_to(compare_dir.resolve()).as_posix()})"
                      for name, p in found)
    return ReportSection("Calibration: reliability diagrams", f"<p>{html.escape(note)}</p><div class='cms'>{body}</div>",
                         f"{note}\n\n{md}\n")


def _best_cells(rows: list[dict]) -> dict[str, object]:
    """The winning value per column (highest accuracy/speed, lowest loss/latency/memory)."""
    ok = [r for r in rows if r.get("runs")]
    best = {}
    for key, pick in (("acc_text", None), ("final_val_acc", max), ("best_val_top5", max), ("train_img_s", max),
                      ("infer_img_s", max), ("best_val_loss", min), ("latency_p50_ms", min),
                      ("latency_p95_ms", min), ("train_time_s", min), ("time_per_epoch_s", min),
                      ("peak_mem_mb", min)):
        if key == "acc_text":
            vals = [r["acc_mean"] for r in ok if r.get("acc_mean") is not None]
            if len(vals) > 1:
                best[key] = max(vals)
            continue
        vals = [r[key] for r in ok if r.get(key) is not None]
        if len(vals) > 1:
            best[key] = pick(vals)
    return best


def _html_table(rows: list[dict], columns, *, table_id: str, row_key: str = "model", mark_best: bool = False) -> str:
    cols = _present_columns(rows, columns)
    best = _best_cells(rows) if mark_best else {}
    value_of = {"acc_text": "acc_mean", "speed_text": "train_img_s"}
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h in cols)
    body = []
    for r in rows:
        cells = []
        for k, _ in cols:
            v = r.get(value_of.get(k, k))
            cls = ' class="best"' if k in best and r.get("runs") and v == best[k] else ""
            if k == "flag_text" and r.get("undertrained"):
                cls = ' class="flag"'
            cells.append(f"<td{cls}>{html.escape(format_value(k, r.get(k)))}</td>")
        body.append(f'<tr class="{html.escape(str(r.get("status", "")))}" data-{row_key}="{html.escape(str(r[row_key]))}">'
                    + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table id="{table_id}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _ranked(models: list[dict]) -> list[dict]:
    done = [m for m in models if m.get("acc_mean") is not None]
    return sorted(done, key=lambda m: -m["acc_mean"])


def _pair_cell(p: dict | None) -> tuple[str, str]:
    """(text, css class) of a pairwise matrix cell: row minus column."""
    if p is None or p.get("diff") is None:
        return "-", ""
    ci = f" [{_pts(p['lo'])}, {_pts(p['hi'])}]" if p.get("lo") is not None else ""
    cls = ("win" if p["diff"] > 0 else "loss") if p.get("significant") else "tie"
    return f"{_pts(p['diff'])}{ci}; {format_p(p.get('p'))}", cls


def _pair_matrix(models: list[dict], pairs: list[dict], *, markdown: bool) -> str:
    names = [m["model"] for m in _ranked(models)]
    if len(names) < 2:
        return ""
    if markdown:
        lines = ["| row minus column | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for a in names:
            cells = ["-" if a == b else _pair_cell(oriented_pair(pairs, a, b))[0] for b in names]
            lines.append(f"| {a} | " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        return "\n".join(lines)
    esc = html.escape
    head = "".join(f"<th>{esc(b)}</th>" for b in names)
    body = []
    for a in names:
        cells = []
        for b in names:
            if a == b:
                cells.append("<td>&mdash;</td>")
                continue
            text, cls = _pair_cell(oriented_pair(pairs, a, b))
            cells.append(f'<td class="{cls}">{esc(text)}</td>')
        body.append(f'<tr data-row="{esc(a)}"><td>{esc(a)}</td>{"".join(cells)}</tr>')
    return (f'<div class="scroll"><table id="pairwise"><thead><tr><th>row minus column (points)</th>{head}</tr>'
            f'</thead><tbody>{"".join(body)}</tbody></table></div>')


def _pair_rows(pairs: list[dict]) -> list[dict]:
    rows = []
    for p in pairs:
        if (p.get("diff") or 0) < 0:  # say it the way round that reads: the better one first
            p = oriented_pair([p], p["b"], p["a"])
        rows.append({"pair": f"{p['a']} vs {p['b']}", "diff": p.get("diff"), "lo": p.get("lo"), "hi": p.get("hi"),
                     "p": p.get("p"), "p_holm": p.get("p_holm"), "verdict": accuracy_sentence(p) if p.get("diff") is not None else "-",
                     "method": p.get("method"), "disc": (f"{p['only_a']} / {p['only_b']}" if p.get("only_a") is not None else None),
                     "speed": speed_claim(p)})
    return rows


PAIR_COLUMNS = [("pair", "pair"), ("diff", "diff (pts)"), ("lo", "95% lo"), ("hi", "95% hi"), ("p", "p"),
                ("p_holm", "p (Holm)"), ("disc", "right only a / only b"), ("method", "tests"), ("speed", "train speed")]


def _pair_value(key, v) -> str:
    if v is None:
        return "-"
    if key in ("diff", "lo", "hi"):
        return _pts(v)
    if key in ("p", "p_holm"):
        return format_p(v).replace("p = ", "").replace("p ", "")
    return str(v)


def _f1_table(results: dict, *, markdown: bool) -> str:
    classes = results.get("classes") or []
    shown = [m for m in _ranked(results["models"]) if m.get("class_f1")]
    if not shown or not classes:
        return ""
    heads = ["class"] + [m["model"] for m in shown]
    rows = []
    for i, c in enumerate(classes):
        vals = [m["class_f1"][i] if i < len(m["class_f1"]) else None for m in shown]
        rows.append((str(c), vals))
    if markdown:
        lines = ["| " + " | ".join(heads) + " |", "|---" * len(heads) + "|"]
        lines += [f"| {c} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in vals) + " |" for c, vals in rows]
        return "\n".join(lines)
    esc = html.escape
    body = []
    for c, vals in rows:
        top = max((v for v in vals if v is not None), default=None)
        cells = "".join(f'<td{" class=best" if v is not None and v == top and len(vals) > 1 else ""}>'
                        f'{"-" if v is None else f"{v:.3f}"}</td>' for v in vals)
        body.append(f"<tr><td>{esc(c)}</td>{cells}</tr>")
    return (f'<div class="scroll"><table id="per-class-f1"><thead><tr>{"".join(f"<th>{esc(h)}</th>" for h in heads)}'
            f'</tr></thead><tbody>{"".join(body)}</tbody></table></div>')


def _disagreement_text(dis: dict | None) -> str:
    if not dis:
        return ""
    return (f"Of {dis['n_images']} images, {len(dis['only_a'])} are right for {dis['a']} and wrong for {dis['b']}, "
            f"{len(dis['only_b'])} the reverse (each model's majority over its runs).")


def render_html(results: dict, figs, cms, *, disagreement_fig: Path | None = None, dis: dict | None = None,
                sections=()) -> str:
    models = results["models"]
    runs = results.get("runs", [])
    pairs = results.get("pairwise", [])
    cfg = results.get("config", {})
    esc = html.escape
    rows = display_rows(models)
    notes = "".join(f"<li>{esc(s)}</li>" for s in baseline_sentences(models, cfg.get("baseline"), pairs))
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>imgarena compare: {esc(', '.join(m['model'] for m in models))}</title>",
        f"<style>{_CSS}</style><script>{_CHECK_JS}</script></head><body>",
        f"<h1>imgarena compare &mdash; {esc(str(cfg.get('data', {}).get('source', '')))}</h1>",
        f"<p class='headline' id='headline'>{esc(results.get('headline', ''))}</p>",
        f"<p>{esc(results.get('conditions', ''))}</p>",
    ]
    if results.get("state") != "complete":
        parts.append(f"<p><b>Partial report</b> ({esc(results.get('state', ''))}): re-run the same command to "
                     "finish the remaining runs; finished ones are skipped.</p>")
    parts.append("<h2>Results (mean and 95% CI per model)</h2>"
                 + _html_table(rows, TABLE_COLUMNS, table_id="results", mark_best=True))
    parts.append("<ul class='rules'>" + "".join(f"<li>{esc(s)}</li>" for s in explanation(results)) + "</ul>")
    if notes:
        parts.append(f"<ul>{notes}</ul>")
    matrix = _pair_matrix(models, pairs, markdown=False)
    if matrix:
        parts.append("<h2>Pairwise differences</h2><p>Ranked accuracy of the row model minus the column model, in "
                     "points, with its 95% interval and p-value; green/red: a real difference, grey: cannot be told "
                     "apart.</p>" + matrix)
        parts.append("<details><summary>Every pair: tests, Holm-adjusted p, disagreements, speed</summary>"
                     + _generic_html_table(_pair_rows(pairs), PAIR_COLUMNS, "pairs", _pair_value) + "</details>")
    f1 = _f1_table(results, markdown=False)
    if f1:
        parts.append("<h2>Per-class F1 (ranked checkpoint, mean over runs)</h2>" + f1)
    if dis:
        parts.append(f"<h2>Where {esc(dis['a'])} and {esc(dis['b'])} disagree</h2><p>{esc(_disagreement_text(dis))}</p>")
        if disagreement_fig is not None:
            parts.append(_img_tag(disagreement_fig, "images where the two top models disagree"))
    for title, path in figs:
        parts.append(f"<h2>{esc(title)}</h2>{_img_tag(path, title)}")
    if cms:
        parts.append("<h2>Confusion matrices (validation, best checkpoint, first run)</h2><div class='cms'>")
        parts += [f"<figure>{_img_tag(p, name + ' confusion matrix')}<figcaption>{esc(name)}</figcaption></figure>"
                  for name, p in cms]
        parts.append("</div>")
    run_rows = _display_runs(runs)
    parts.append(f"<details><summary>Every run ({len(run_rows)})</summary>"
                 + _html_table(run_rows, _run_columns(cfg), table_id="runs", row_key="run") + "</details>")
    for sec in sections:  # optional extra sections (e.g. side-by-side explanations)
        parts.append(f"<h2>{esc(sec.title)}</h2>{sec.html}")
    parts.append(f"<h2>Configuration</h2><pre>{esc(json.dumps(cfg, indent=2, default=str))}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _generic_html_table(rows, columns, table_id, fmt) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for _, h in columns)
    body = "".join("<tr>" + "".join(f"<td>{esc(fmt(k, r.get(k)))}</td>" for k, _ in columns) + "</tr>" for r in rows)
    return f'<div class="scroll"><table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _run_columns(cfg: dict):
    drop = set()
    if (cfg.get("folds") or 1) == 1:
        drop |= {"fold", "repeat"}
    elif (cfg.get("repeats") or 1) == 1:
        drop.add("repeat")
    return [c for c in RUN_COLUMNS if c[0] not in drop]


def _display_runs(runs: list[dict]) -> list[dict]:
    out = []
    for r in runs:
        d = dict(r)
        d["run"] = f"{r['model']}/{r.get('seed')}/{r.get('fold')}/{r.get('repeat')}"
        if r.get("undertrained") is not None:
            d["undertrained"] = (r.get("undertrained_reason") or "yes") if r["undertrained"] else "no"
        out.append(d)
    return _with_transfer(out)


def render_markdown(results: dict, compare_dir: Path, figs, cms, *, disagreement_fig: Path | None = None,
                    dis: dict | None = None, sections=()) -> str:
    models = results["models"]
    cfg = results.get("config", {})
    rows = display_rows(models)
    rel = lambda p: Path(p).resolve().relative_to(compare_dir.resolve()).as_posix()  # noqa: E731
    lines = [f"# imgarena compare: {cfg.get('data', {}).get('source', '')}", "", f"**{results.get('headline', '')}**",
             "", results.get("conditions", ""), ""]
    if results.get("state") != "complete":
        lines += [f"_Partial report ({results.get('state')}): re-run the same command to finish._", ""]
    lines += ["## Results (mean and 95% CI per model)", "", format_table(rows, TABLE_COLUMNS, markdown=True), ""]
    lines += [f"- {s}" for s in explanation(results)]
    lines += [f"- {s}" for s in baseline_sentences(models, cfg.get("baseline"), results.get("pairwise"))]
    lines.append("")
    matrix = _pair_matrix(models, results.get("pairwise", []), markdown=True)
    if matrix:
        lines += ["## Pairwise differences (row minus column, points [95% CI]; p)", "", matrix, ""]
        lines += [f"- {r['verdict']} ({r['method']}; Holm p {_pair_value('p_holm', r['p_holm'])})"
                  + (f"; {r['speed']}" if r.get("speed") else "") for r in _pair_rows(results.get("pairwise", []))]
        lines.append("")
    f1 = _f1_table(results, markdown=True)
    if f1:
        lines += ["## Per-class F1 (ranked checkpoint, mean over runs)", "", f1, ""]
    if dis:
        lines += [f"## Where {dis['a']} and {dis['b']} disagree", "", _disagreement_text(dis), ""]
        if disagreement_fig is not None:
            lines += [f"![disagreements]({rel(disagreement_fig)})", ""]
    for title, path in figs:
        lines += [f"## {title}", "", f"![{title}]({rel(path)})", ""]
    if cms:
        lines += ["## Confusion matrices", ""]
        for name, p in cms:
            lines += [f"### {name}", "", f"![{name}]({rel(p)})", ""]
    lines += ["## Every run", "", format_table(_display_runs(results.get("runs", [])), _run_columns(cfg), markdown=True), ""]
    for sec in sections:
        lines += [f"## {sec.title}", "", sec.markdown, ""]
    return "\n".join(lines)


def strip_images(dis: dict | None) -> dict | None:
    """The disagreement record without its image arrays (for JSON)."""
    if dis is None:
        return None
    strip = lambda items: [{k: v for k, v in it.items() if k != "image"} for it in items]  # noqa: E731
    return {**dis, "only_a": strip(dis["only_a"]), "only_b": strip(dis["only_b"])}


def write_report(compare_dir, results: dict, *, disagreement: dict | None = None, figures: bool = True,
                 sections=()) -> Path:
    """Write results.json, results.csv (one row per run), models.csv, pairwise.csv and, with
    `figures`, report.md and report.html into `compare_dir`; returns report.html.

    `results` = {"config", "models" (rows per MODEL_FIELDS), "runs" (per RUN_FIELDS), "pairwise",
    "state", "headline", "conditions", "rule", "classes"}. `disagreement` (comparison.disagreements,
    items optionally carrying their uint8 "image") feeds the disagreement section; `sections`
    (ReportSection) are inserted before the configuration. Each file is replaced atomically, so an
    interrupted write leaves the previous complete version."""
    compare_dir = Path(compare_dir)
    models = results["models"]
    runs = results.get("runs", models)
    dis = strip_images(disagreement)
    results = {**results, "runs": runs, "disagreements": dis,
               "headline": results.get("headline") or headline(models, results.get("pairwise", []),
                                                                results.get("config", {}).get("baseline"))}
    write_json(compare_dir / "results.json", results)
    write_csv(compare_dir / "results.csv", runs, RUN_FIELDS)
    write_csv(compare_dir / "models.csv", models, MODEL_FIELDS)
    write_csv(compare_dir / "pairwise.csv", results.get("pairwise", []), PAIR_FIELDS)
    report = compare_dir / "report.html"
    if not figures and report.is_file():
        return report  # mid-round: the last round's report stands; figures follow when the round is done
    figs = _figures(compare_dir, results, disagreement)
    cms = _confusion_images(compare_dir, models)
    reliability = reliability_section(compare_dir, models)
    if reliability is not None:
        sections = (reliability, *sections)
    dis_fig = None
    if disagreement is not None:
        path = compare_dir / FIGURES / "disagreements.png"
        if plot_disagreements(disagreement, results.get("classes") or [], path):
            dis_fig = path
    kw = dict(disagreement_fig=dis_fig, dis=dis, sections=tuple(sections))
    atomic_write_text(compare_dir / "report.md", render_markdown(results, compare_dir, figs, cms, **kw))
    page = render_html(results, figs, cms, **kw)
    atomic_write(report, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    return report

"""The statistics behind `imgarena compare`'s verdicts: intervals per model, tests per pair, the
"undertrained" rule. Pure numpy + scipy (no torch), so a report can be rebuilt anywhere.

Design (what is compared with what, and why):

- A *run* is one training of one model: (seed, fold, repeat). Runs of two models are *matched*
  when they share that key: the same seed (so the same batch order) on the same split or fold.
- Per model, the ranking metric's interval is a Student-t 95% interval across its runs
  (`scipy.stats.t`), which measures retraining noise; with a single run there is no spread to
  measure, so it is the Wilson 95% interval of that run's accuracy over its evaluation images
  (`scipy.stats.binomtest(...).proportion_ci(method="wilson")`), which measures image noise.
- Per pair, two sources of noise can fake a difference: which images happen to be in the
  evaluation set, and which seed happened to train the model. Each has its own test:
  * image-level: one matched run each -> McNemar's exact test on per-image correctness (a
    binomial test of the discordant pairs, `scipy.stats.binomtest`), with the conditional exact
    (Clopper-Pearson) interval of the difference, consistent with that test. Several matched runs
    -> each image counts once, with each model's correctness averaged over its runs, and a paired
    t-test over images (`scipy.stats.ttest_rel`). Pooling the discordant pairs of all runs into
    one McNemar test would count every image once per seed as if it were a new image, and
    overstate the evidence.
  * run-level (two or more matched runs): a paired t-test of the matched runs' accuracies
    (`scipy.stats.ttest_rel`); with cross-validation folds the variance gets Nadeau & Bengio's
    correction for overlapping training sets (pass `test_train_ratio`).
  A difference is called real only when every test that applies says so: the reported p-value is
  the largest of them and the interval spans theirs (an intersection-union test, valid at 5%).
- Speed: train throughput compared on the log scale with Welch's t-test (runs of two models are
  not paired in time: the machine's load drifts), samples = one per run, or with a single run the
  run's full epochs.
"""

from __future__ import annotations

import math

import numpy as np

ALPHA = 0.05
LEVEL = 1 - ALPHA


# ---------------------------------------------------------------- one model

def mean_interval(values, *, n_eval: int | None = None) -> dict:
    """{mean, std, lo, hi, n, method} of a metric over a model's runs (fractions in [0, 1]).

    Two or more runs: Student-t interval across runs. One run with `n_eval` images: Wilson interval."""
    from scipy import stats

    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    out = {"mean": None, "std": None, "lo": None, "hi": None, "n": int(v.size), "method": None}
    if v.size == 0:
        return out
    out["mean"] = float(v.mean())
    if v.size >= 2:
        sd = float(v.std(ddof=1))
        out["std"] = sd
        if np.ptp(v) > 1e-12:
            lo, hi = stats.t.interval(LEVEL, v.size - 1, loc=v.mean(), scale=sd / math.sqrt(v.size))
        else:
            lo = hi = float(v.mean())
        # accuracies live in [0, 1]: a t-interval from few runs can overshoot, clip it
        out.update(lo=max(0.0, float(lo)), hi=min(1.0, float(hi)), method=f"t-interval over {v.size} runs")
    elif n_eval:
        k = int(round(float(v[0]) * n_eval))
        ci = stats.binomtest(k, n_eval).proportion_ci(confidence_level=LEVEL, method="wilson")
        out.update(lo=float(ci.low), hi=float(ci.high), method=f"Wilson interval over {n_eval} images (1 run)")
    return out


# ---------------------------------------------------------------- two models

def mcnemar_exact(a_correct, b_correct) -> dict:
    """McNemar's exact test on per-image correctness of two models scored on the same images.

    diff = acc(a) - acc(b); lo/hi: conditional exact interval (Clopper-Pearson on the share of the
    discordant images that `a` got right, scaled by the discordant share)."""
    from scipy import stats

    a = np.asarray(a_correct, dtype=bool)
    b = np.asarray(b_correct, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"per-image correctness of different lengths ({a.size} vs {b.size})")
    n = int(a.size)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    disc = only_a + only_b
    diff = (only_a - only_b) / n if n else 0.0
    if disc == 0:
        return {"diff": 0.0, "lo": 0.0, "hi": 0.0, "p": 1.0, "n_images": n, "only_a": 0, "only_b": 0,
                "test": "McNemar exact"}
    res = stats.binomtest(only_a, disc, 0.5)
    ci = res.proportion_ci(confidence_level=LEVEL, method="exact")
    scale = disc / n
    return {"diff": diff, "lo": scale * (2 * ci.low - 1), "hi": scale * (2 * ci.high - 1), "p": float(res.pvalue),
            "n_images": n, "only_a": only_a, "only_b": only_b, "test": "McNemar exact"}


def image_paired_t(a_mean_correct, b_mean_correct) -> dict:
    """Paired t-test over images of each model's correctness averaged over its runs."""
    from scipy import stats

    a = np.asarray(a_mean_correct, dtype=np.float64)
    b = np.asarray(b_mean_correct, dtype=np.float64)
    d = a - b
    n = int(d.size)
    base = {"diff": float(d.mean()) if n else 0.0, "n_images": n, "only_a": int((d > 0).sum()),
            "only_b": int((d < 0).sum()), "test": "paired t over images (correctness averaged over runs)"}
    if n < 2:
        return {**base, "lo": None, "hi": None, "p": None}
    if np.ptp(d) < 1e-12:  # no spread: every image moved the same way (all 0: no difference at all)
        return {**base, "lo": base["diff"], "hi": base["diff"], "p": 1.0 if base["diff"] == 0 else 0.0}
    res = stats.ttest_rel(a, b)
    ci = res.confidence_interval(confidence_level=LEVEL)
    return {**base, "lo": float(ci.low), "hi": float(ci.high), "p": float(res.pvalue)}


def run_paired_t(a_acc, b_acc, *, test_train_ratio: float | None = None) -> dict:
    """Paired t-test of matched runs' accuracies; Nadeau-Bengio corrected when `test_train_ratio`
    (n_val / n_train of a fold) is given, since folds' training sets overlap."""
    from scipy import stats

    a = np.asarray(a_acc, dtype=np.float64)
    b = np.asarray(b_acc, dtype=np.float64)
    d = a - b
    k = int(d.size)
    mean = float(d.mean())
    base = {"diff": mean, "n_runs": k, "test": "paired t over runs"}
    sd = float(d.std(ddof=1)) if k >= 2 else 0.0
    if k < 2 or np.ptp(d) < 1e-12:
        return {**base, "lo": None, "hi": None, "p": None}  # no spread across runs to judge by
    if test_train_ratio:
        se = sd * math.sqrt(1 / k + test_train_ratio)
        t = mean / se
        p = float(2 * stats.t.sf(abs(t), k - 1))
        half = float(stats.t.ppf(1 - ALPHA / 2, k - 1)) * se
        return {**base, "lo": mean - half, "hi": mean + half, "p": p,
                "test": "paired t over runs (Nadeau-Bengio corrected)"}
    res = stats.ttest_rel(a, b)
    ci = res.confidence_interval(confidence_level=LEVEL)
    return {**base, "lo": float(ci.low), "hi": float(ci.high), "p": float(res.pvalue)}


def compare_pair(a_runs: dict, b_runs: dict, *, test_train_ratio: float | None = None) -> dict:
    """The verdict on "a vs b" from their runs.

    `a_runs`/`b_runs`: {run key (seed, fold, repeat): {"acc": float, "ids": array | None,
    "correct": bool array | None}}, the per-image arrays over the images that run was scored on.
    Returns {diff, lo, hi, p, significant, better, n_runs, n_images, tests: [...], method}."""
    keys = sorted(set(a_runs) & set(b_runs))
    out = {"diff": None, "lo": None, "hi": None, "p": None, "significant": False, "better": None,
           "n_runs": len(keys), "n_images": None, "only_a": None, "only_b": None, "tests": [], "method": ""}
    if not keys:
        return out
    tests = []
    per_image = all(a_runs[k].get("correct") is not None and b_runs[k].get("correct") is not None for k in keys)
    if per_image:
        if len(keys) == 1:
            k = keys[0]
            _same_images(a_runs[k], b_runs[k])
            tests.append(mcnemar_exact(a_runs[k]["correct"], b_runs[k]["correct"]))
        else:
            ids, a_mean, b_mean = _per_image_means(a_runs, b_runs, keys)
            tests.append(image_paired_t(a_mean, b_mean))
    if len(keys) >= 2:
        tests.append(run_paired_t([a_runs[k]["acc"] for k in keys], [b_runs[k]["acc"] for k in keys],
                                  test_train_ratio=test_train_ratio))
    diff = float(np.mean([a_runs[k]["acc"] - b_runs[k]["acc"] for k in keys]))
    usable = [t for t in tests if t.get("p") is not None]
    out.update(diff=diff, tests=tests, method=" + ".join(t["test"] for t in tests) or "none")
    img = next((t for t in tests if "n_images" in t), None)
    if img:
        out.update(n_images=img["n_images"], only_a=img["only_a"], only_b=img["only_b"])
    if usable:
        out["p"] = max(t["p"] for t in usable)
        los = [t["lo"] for t in usable if t.get("lo") is not None]
        his = [t["hi"] for t in usable if t.get("hi") is not None]
        out["lo"], out["hi"] = (min(los) if los else None), (max(his) if his else None)
        # every applicable test must agree; a test that could not be run (no spread) blocks a claim
        complete = len(usable) == len(tests)
        out["significant"] = bool(complete and out["p"] < ALPHA and diff != 0)
    if out["significant"]:
        out["better"] = "a" if diff > 0 else "b"
    return out


def _same_images(ra: dict, rb: dict) -> None:
    ia, ib = ra.get("ids"), rb.get("ids")
    if ia is not None and ib is not None and not np.array_equal(np.asarray(ia), np.asarray(ib)):
        raise ValueError("matched runs were scored on different images")


def _per_image_means(a_runs, b_runs, keys):
    """Each image once: per-image correctness of each model averaged over the matched runs that
    scored it (with folds, an image is scored by one fold per repeat)."""
    sums: dict = {}
    for k in keys:
        _same_images(a_runs[k], b_runs[k])
        ids = a_runs[k].get("ids")
        ids = np.arange(len(a_runs[k]["correct"])) if ids is None else np.asarray(ids)
        for i, ca, cb in zip(ids.tolist(), np.asarray(a_runs[k]["correct"], bool), np.asarray(b_runs[k]["correct"], bool)):
            s = sums.setdefault(i, [0, 0, 0])
            s[0] += ca
            s[1] += cb
            s[2] += 1
    ids = list(sums)
    a = np.array([sums[i][0] / sums[i][2] for i in ids])
    b = np.array([sums[i][1] / sums[i][2] for i in ids])
    return ids, a, b


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment for the family of pairwise tests (None stays None)."""
    idx = [i for i, p in enumerate(pvalues) if p is not None]
    order = sorted(idx, key=lambda i: pvalues[i])
    m = len(order)
    adj: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adj[i] = running
    return adj


# ---------------------------------------------------------------- speed

def speed_ratio(a_samples, b_samples) -> dict:
    """Throughput ratio a/b (geometric means) with a Welch 95% interval on the log scale."""
    from scipy import stats

    la = np.log([x for x in a_samples if x and x > 0])
    lb = np.log([x for x in b_samples if x and x > 0])
    out = {"ratio": None, "lo": None, "hi": None, "p": None, "n_a": int(la.size), "n_b": int(lb.size)}
    if la.size == 0 or lb.size == 0:
        return out
    out["ratio"] = float(math.exp(la.mean() - lb.mean()))
    if la.size >= 2 and lb.size >= 2 and (la.std() > 0 or lb.std() > 0):
        res = stats.ttest_ind(la, lb, equal_var=False)
        ci = res.confidence_interval(confidence_level=LEVEL)
        out.update(lo=float(math.exp(ci.low)), hi=float(math.exp(ci.high)), p=float(res.pvalue))
    return out


# ---------------------------------------------------------------- undertrained

def epochs_trained(history: list[dict]) -> float:
    """Epochs actually trained: full epochs plus the fraction of one cut short by the time budget."""
    return float(sum(r.get("partial", 1.0) for r in history))


def accuracy_noise(acc: float, n: int) -> float:
    """Binomial standard error of an accuracy measured on n images."""
    return math.sqrt(max(acc * (1 - acc), 1.0 / n) / n) if n else float("inf")


MIN_EPOCHS_TO_JUDGE = 3  # fewer val points than this show no plateau, so the run counts as undertrained


def undertrained(history: list[dict], n_val: int, *, train_time_s: float | None = None) -> dict:
    """{undertrained, reason, needed_epochs, needed_s} for one run's metrics.jsonl rows.

    Undertrained: less than one epoch trained, fewer than MIN_EPOCHS_TO_JUDGE epochs (too few points
    to show a plateau), or the val curve still rising at the end: the last
    third of the epochs (at least one) gained more than the noise, 2 x sqrt(2) x the binomial SE of
    the final val accuracy (two estimates on n_val images, each with SE sqrt(p(1-p)/n_val)).
    needed_epochs extrapolates a saturating curve acc(e) = A - B exp(-e / tau) fitted to the val
    accuracies to where the gain still to come falls below one SE (twice the epochs trained when
    the fit fails); needed_s converts it with the run's training seconds per epoch."""
    rows = [r for r in history if r.get("val_acc") is not None]
    done = epochs_trained(history)
    out = {"undertrained": False, "reason": None, "needed_epochs": None, "needed_s": None, "epochs_trained": done}
    per_epoch = (train_time_s / done) if train_time_s and done > 0 else None
    if not rows:
        return out
    if done < 1:
        out.update(undertrained=True, reason=f"{done:.2f} of an epoch", needed_epochs=1.0)
        if per_epoch:
            out["needed_s"] = per_epoch  # at least one full epoch; too few points to extrapolate further
        return out
    accs = [r["val_acc"] for r in rows]
    if done < MIN_EPOCHS_TO_JUDGE:
        # One or two val points cannot show a curve levelling off -- least of all under a schedule
        # annealed to zero at the time budget, which flattens the last epoch whatever the model's state.
        out.update(undertrained=True, needed_epochs=float(MIN_EPOCHS_TO_JUDGE),
                   reason=f"only {done:.2f} epochs: too few to see the val curve level off")
        if per_epoch:
            out["needed_s"] = float(MIN_EPOCHS_TO_JUDGE * per_epoch)
        return out
    k = max(1, len(accs) // 3)
    gain = accs[-1] - accs[-1 - k]
    se = accuracy_noise(accs[-1], n_val)
    noise = 2 * math.sqrt(2) * se
    if gain <= noise:
        return out
    need = _extrapolate_epochs(np.cumsum([r.get("partial", 1.0) for r in history])[-len(accs):], accs, se)
    need = max(need if need is not None else 2 * done, done + 1)
    out.update(undertrained=True, needed_epochs=float(need),
               reason=f"val acc still rising: +{100 * gain:.1f} pts over the last {k} epoch(s), noise {100 * noise:.1f}")
    if per_epoch:
        out["needed_s"] = float(need * per_epoch)
    return out


def _extrapolate_epochs(epochs, accs, se: float) -> float | None:
    """Epoch where a fitted acc(e) = A - B exp(-e / tau) has less than `se` still to gain."""
    if len(accs) < 3:
        return None
    import warnings

    from scipy.optimize import curve_fit

    e = np.asarray(epochs, dtype=np.float64)
    y = np.asarray(accs, dtype=np.float64)

    def f(x, a, b, tau):
        return a - b * np.exp(-x / tau)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (a, b, tau), _ = curve_fit(f, e, y, p0=(min(1.0, y.max() + 0.05), max(y.max() - y.min(), 1e-3) * 2, e[-1]),
                                       bounds=([0, 0, 1e-3], [1.0, 10.0, 1e4]), maxfev=2000)
    except (RuntimeError, ValueError):
        return None
    if b <= se:
        return float(e[-1])
    need = tau * math.log(b / se)
    return float(need) if math.isfinite(need) else None

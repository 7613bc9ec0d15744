"""Tables and figure of a claim grid (claim.py) from its result rows: pure maths + matplotlib.

Per nuisance curve (the p = 0 rows, which tie nothing, belong to every curve) and per
(model, strength): the mean and sample standard deviation (ddof=1) over seeds of the
final-epoch test accuracy with its 95% confidence interval (Student t, n - 1 degrees
of freedom), the maximum over seeds of the best-epoch accuracy (the paper's protocol),
each model's drop from p = 0 paired by seed, and paired differences: one model minus
another trained on the same seed, so the data set and initialisation are shared and
their variance cancels. A paper ordering "a > b" at one p is *supported* when the 95%
interval of a - b lies above 0, *contradicted* when it lies below, else *undecided*.
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats as sps  # noqa: E402

from qcs_jax.data.synthetic import CLASS_NAMES  # noqa: E402

MODEL_ORDER = ("baseline", "dcs", "qcs-sd", "qcs-s", "qcs-d")
# The paper's orderings: QCS > DCS > baseline and SD > S > D.
CLAIM_PAIRS = (("dcs", "baseline"), ("qcs-sd", "dcs"), ("qcs-sd", "baseline"),
               ("qcs-sd", "qcs-s"), ("qcs-s", "qcs-d"))


def _order(models: Iterable[str]) -> list[str]:
  models = set(models)
  return [m for m in MODEL_ORDER if m in models] + sorted(models - set(MODEL_ORDER))


def _strength_key(p) -> float:
  return -1.0 if p is None else float(p)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for a single value)."""
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def ci95(values: Sequence[float]) -> tuple[float, float] | None:
  """The 95% t interval of the mean (None for fewer than two values)."""
  n = len(values)
  if n < 2:
    return None
  mean, std = mean_std(values)
  half = float(sps.t.ppf(0.975, n - 1)) * std / np.sqrt(n)
  return mean - half, mean + half


def verdict(ci: tuple[float, float] | None) -> str:
  if ci is None:
    return "undecided (n<2)"
  if ci[0] > 0:
    return "supported"
  if ci[1] < 0:
    return "contradicted"
  return "undecided"


def curves(rows: Sequence[dict]) -> dict[str, list[dict]]:
  """nuisance -> its rows (the p = 0 rows join every nuisance's curve)."""
  names = sorted({r.get("nuisance", "") for r in rows if r["strength"]} - {""})
  if not names:
    return {"": list(rows)}
  return {n: [r for r in rows if not r["strength"] or r.get("nuisance", "") == n]
          for n in names}


def summarize(rows: Sequence[dict]) -> dict[tuple[str, float | None], dict]:
  """(model, strength) -> n, seeds, mean/std/95% CI of final accuracy, max of best-epoch."""
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault((r["model"], r["strength"]), []).append(r)
  out = {}
  for key, rs in groups.items():
    rs = sorted(rs, key=lambda r: r["seed"])
    accs = [r["final_accuracy"] for r in rs]
    mean, std = mean_std(accs)
    out[key] = {"n": len(rs), "seeds": [r["seed"] for r in rs], "mean": mean, "std": std,
                "ci": ci95(accs), "max_best": max(r["best_accuracy"] for r in rs),
                "max_final": max(r["final_accuracy"] for r in rs)}
  return out


def _paired_diffs(acc: dict, a, b) -> dict | None:
  seeds = sorted(s for (k, s) in acc if k == a and (b, s) in acc)
  if not seeds:
    return None
  diffs = [acc[(a, s)] - acc[(b, s)] for s in seeds]
  mean, std = mean_std(diffs)
  return {"n": len(seeds), "mean": mean, "std": std, "ci": ci95(diffs),
          "wins": sum(d > 0 for d in diffs), "diffs": diffs, "seeds": seeds}


def paired(rows: Sequence[dict], a: str, b: str, strength) -> dict | None:
  """a minus b in final accuracy over the seeds both ran at ``strength``; None if none."""
  acc = {(r["model"], r["seed"]): r["final_accuracy"] for r in rows
         if r["strength"] == strength and r["model"] in (a, b)}
  return _paired_diffs(acc, a, b)


def drop(rows: Sequence[dict], model: str, strength) -> dict | None:
  """Accuracy at p = 0 minus at ``strength`` (positive: lost), paired by seed."""
  acc = {(r["strength"], r["seed"]): r["final_accuracy"] for r in rows
         if r["model"] == model and r["strength"] in (0.0, strength)}
  return _paired_diffs(acc, 0.0, strength)


def _pct(x: float) -> str:
  return f"{100 * x:.1f}"


def _col(p) -> str:
  return "accuracy" if p is None else f"p = {p:g}"


def _diff(d: dict | None) -> str:
  if d is None:
    return "–"
  ci = "" if d["ci"] is None else f" [{100 * d['ci'][0]:+.1f}, {100 * d['ci'][1]:+.1f}]"
  return f"{100 * d['mean']:+.1f}{ci} ({d['wins']}/{d['n']})"


def table_markdown(rows: Sequence[dict]) -> str:
  """Markdown tables of one curve: accuracy, paper protocol, drops, paired differences
  with 95% CIs, and the verdict on each of the paper's orderings."""
  stats = summarize(rows)
  models = _order({m for m, _ in stats})
  strengths = sorted({p for _, p in stats}, key=_strength_key)
  head = "| model | " + " | ".join(_col(p) for p in strengths) + " |\n"
  rule = "|---|" + "---|" * len(strengths) + "\n"
  t1 = ("Test accuracy (%) at the last epoch, mean ± std over seeds [max over seeds], "
        "95% CI of the mean:\n\n" + head + rule)
  t2 = "Paper protocol: maximum over seeds of the best-epoch test accuracy (%):\n\n" + head + rule
  for m in models:
    c1, c2 = [], []
    for p in strengths:
      s = stats.get((m, p))
      ci = "" if s is None or s["ci"] is None else \
          f" {{{_pct(s['ci'][0])}, {_pct(s['ci'][1])}}}"
      c1.append("–" if s is None else
                f"{_pct(s['mean'])} ± {_pct(s['std'])} [{_pct(s['max_final'])}]{ci} (n={s['n']})")
      c2.append("–" if s is None else _pct(s["max_best"]))
    t1 += f"| {m} | " + " | ".join(c1) + " |\n"
    t2 += f"| {m} | " + " | ".join(c2) + " |\n"
  out = t1 + "\n" + t2
  confounded = [p for p in strengths if p]
  if 0.0 in strengths and confounded:
    h = "| model | " + " | ".join(_col(p) for p in confounded) + " |\n"
    t = ("Drop from p = 0 (points lost, same seed), mean [95% CI] (seeds where it "
         "dropped):\n\n" + h + "|---|" + "---|" * len(confounded) + "\n")
    for m in models:
      t += f"| {m} | " + " | ".join(_diff(drop(rows, m, p)) for p in confounded) + " |\n"
    out += "\n" + t
  t3 = ("Paired differences (points, same seed), mean [95% CI] (seeds where the first "
        "model wins), and the verdict on the paper's ordering:\n\n| pair | "
        + " | ".join(_col(p) for p in strengths) + " |\n" + rule)
  any_pair = False
  for a, b in CLAIM_PAIRS:
    cells = [paired(rows, a, b, p) for p in strengths]
    if not any(cells):
      continue
    any_pair = True
    t3 += f"| {a} − {b} | " + " | ".join(
        "–" if d is None else f"{_diff(d)} {verdict(d['ci'])}" for d in cells) + " |\n"
  return out + ("\n" + t3 if any_pair else "")


def _colour(model: str) -> str | None:
  """One colour per model in every panel (matplotlib's cycle for a model not listed)."""
  return f"C{MODEL_ORDER.index(model)}" if model in MODEL_ORDER else None


def _strength_label(nuisance: str) -> str:
  return (f"confound strength p of {nuisance or 'the nuisance'} "
          "(train split; test split independent)")


def _band(ax, xs, stats: list[dict], model: str, label: str, marker: str = "o") -> None:
  """A mean line (in points) with its 95% CI as a band of the same colour."""
  means = np.asarray([100 * s["mean"] for s in stats])
  lo = np.asarray([100 * (s["ci"][0] if s["ci"] else s["mean"]) for s in stats])
  hi = np.asarray([100 * (s["ci"][1] if s["ci"] else s["mean"]) for s in stats])
  ax.plot(xs, means, marker=marker, label=label, lw=1.5, color=_colour(model))
  ax.fill_between(xs, lo, hi, color=_colour(model), alpha=0.15, lw=0)


def _accuracy_panel(ax, nuisance: str, rs: Sequence[dict], title: str) -> None:
  stats = summarize(rs)
  models = _order({m for m, _ in stats})
  strengths = sorted({p for _, p in stats}, key=_strength_key)
  real = strengths == [None]
  for i, m in enumerate(models):
    ps = [p for p in strengths if (m, p) in stats]
    if real:
      s = stats[(m, None)]
      lo, hi = s["ci"] or (s["mean"], s["mean"])
      ax.bar(i, 100 * s["mean"], yerr=[[100 * (s["mean"] - lo)], [100 * (hi - s["mean"])]],
             capsize=4, label=m, alpha=0.8, color=_colour(m))
      xs = [float(i)]
    else:
      xs = [float(p) for p in ps]
      _band(ax, xs, [stats[(m, p)] for p in ps], m, m)
    for p, x in zip(ps, xs):
      accs = [100 * r["final_accuracy"] for r in rs if r["model"] == m and r["strength"] == p]
      ax.scatter([x] * len(accs), accs, s=9, color="k", alpha=0.35, zorder=3)
  if real:
    ax.set_xticks(range(len(models)), models)
  else:
    ax.set_xticks(strengths)
  chance = 100 / len(CLASS_NAMES)
  lowest = min((100 * r["final_accuracy"] for r in rs), default=chance)
  synthetic = bool(rs) and rs[0].get("settings", {}).get("data") == "synthetic"
  near = lowest < chance + 20  # the line is drawn only where it does not flatten the curves
  if synthetic and near:
    ax.axhline(chance, color="gray", ls="--", lw=1, label=f"chance (1/{len(CLASS_NAMES)})")
  ax.set_ylabel("test accuracy (%), last epoch" +
                (f"; chance {chance:.1f}" if synthetic and not near else ""))
  seeds = max((s["n"] for s in stats.values()), default=0)
  ax.set_title(title or f"{nuisance + ': ' if nuisance else ''}mean, 95% CI band "
               f"(up to {seeds} seeds); dots: single runs", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)


def _difference_panel(ax, nuisance: str, rs: Sequence[dict]) -> None:
  """Each model minus the baseline trained on the same seed, with its 95% CI band."""
  strengths = sorted({r["strength"] for r in rs})
  for m in _order({r["model"] for r in rs} - {"baseline"}):
    pts = [(p, d) for p in strengths if (d := paired(rs, m, "baseline", p))]
    if pts:
      _band(ax, [float(p) for p, _ in pts], [d for _, d in pts], m, f"{m} − baseline", "s")
  ax.axhline(0, color="k", lw=0.8)
  ax.set_xticks(strengths)
  ax.set_xlabel(_strength_label(nuisance), fontsize=8)
  ax.set_ylabel("paired difference (points)")
  ax.set_title("minus the baseline on the same seed: mean, 95% CI band", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)


def plot(rows: Sequence[dict], path: str, title: str = "") -> str:
  """Test accuracy vs confound strength, one column per nuisance, one line per model:
  the mean with its 95% CI as a band, single runs as dots; below it, when the grid has
  a baseline, each model's paired difference from it (the claim's test). Real-data
  grids (no strength) draw one bar per model with its 95% CI instead."""
  panels = curves(rows)
  models = {r["model"] for r in rows}
  strengths = {r["strength"] for r in rows}
  diff_row = None not in strengths and "baseline" in models and len(models) > 1
  n_rows = 2 if diff_row else 1
  fig, axes = plt.subplots(n_rows, len(panels), figsize=(6.4 * len(panels), 4.2 * n_rows),
                           dpi=110, squeeze=False)
  for j, (nuisance, rs) in enumerate(panels.items()):
    _accuracy_panel(axes[0][j], nuisance, rs, title)
    if diff_row:
      _difference_panel(axes[1][j], nuisance, rs)
    elif None not in strengths:
      axes[0][j].set_xlabel(_strength_label(nuisance), fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def plot_epochs(rows: Sequence[dict], path: str, label=lambda r: r["cell"]) -> str:
  """Test accuracy after every epoch, one line per row (the recipe search's figure)."""
  fig, ax = plt.subplots(figsize=(7.2, 4.2 + 0.2 * len(rows)), dpi=110)
  for r in rows:
    accs = [100 * a for a in r["epoch_accuracies"]]
    ax.plot(range(1, len(accs) + 1), accs, marker=".", lw=1.2, label=label(r))
  ax.axhline(60, color="gray", ls=":", lw=1, label="60% (issue 27's bar)")
  longest = max((len(r["epoch_accuracies"]) for r in rows), default=1)
  ax.set_xticks(range(1, longest + 1, max(1, longest // 9)))
  ax.set_xlabel("epoch (2,304 training faces each)")
  ax.set_ylabel("test accuracy (%)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def write_report(rows: Sequence[dict], out: str) -> tuple[str, str]:
  """OUT/claim_table.md (one section per nuisance) and OUT/claim.png from the rows."""
  if not rows:
    raise ValueError(f"{out}: no finished runs to report")
  settings = rows[0].get("settings", {})
  budget = sorted({r["images_through_backbone"] for r in rows})
  cpu = sum(r.get("cpu_s", 0.0) for r in rows)
  shown = ", ".join(f"{k}={v}" for k, v in settings.items() if v not in ("", (), []))
  lines = [f"Settings: {shown}",
           f"Images through the backbone per run: {', '.join(map(str, budget))}",
           f"Rows: {len(rows)}, {cpu / 3600:.2f} CPU-hours in all", ""]
  body = []
  for nuisance, rs in curves(rows).items():
    body.append((f"## Nuisance: {nuisance}\n\n" if nuisance else "") + table_markdown(rs))
  os.makedirs(out, exist_ok=True)
  table = os.path.join(out, "claim_table.md")
  with open(table, "w") as f:
    f.write("\n".join(lines) + "\n" + "\n".join(body))
  return table, plot(rows, os.path.join(out, "claim.png"))

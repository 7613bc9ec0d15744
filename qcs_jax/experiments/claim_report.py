"""Table and figure of a claim grid (claim.py) from its result rows: pure maths + matplotlib.

Per (model, strength): the mean and sample standard deviation (ddof=1) over seeds of
the final-epoch test accuracy, the maximum over seeds of the best-epoch accuracy
(the paper's protocol: best of five runs, best epoch), and paired differences: a
model minus the baseline (and the claim's other pairs) trained on the same seed, so
the data set and the initialisation seed are shared and their variance cancels.
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np

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


def summarize(rows: Sequence[dict]) -> dict[tuple[str, float | None], dict]:
  """(model, strength) -> n, seeds, mean/std of final accuracy, max of best-epoch accuracy."""
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault((r["model"], r["strength"]), []).append(r)
  out = {}
  for key, rs in groups.items():
    rs = sorted(rs, key=lambda r: r["seed"])
    mean, std = mean_std([r["final_accuracy"] for r in rs])
    out[key] = {"n": len(rs), "seeds": [r["seed"] for r in rs], "mean": mean, "std": std,
                "max_best": max(r["best_accuracy"] for r in rs),
                "max_final": max(r["final_accuracy"] for r in rs)}
  return out


def paired(rows: Sequence[dict], a: str, b: str, strength) -> dict | None:
  """a minus b in final accuracy over the seeds both ran at ``strength``; None if none."""
  acc = {}
  for r in rows:
    if r["strength"] == strength and r["model"] in (a, b):
      acc[(r["model"], r["seed"])] = r["final_accuracy"]
  seeds = sorted(s for (m, s) in acc if m == a and (b, s) in acc)
  if not seeds:
    return None
  diffs = [acc[(a, s)] - acc[(b, s)] for s in seeds]
  mean, std = mean_std(diffs)
  return {"n": len(seeds), "mean": mean, "std": std, "wins": sum(d > 0 for d in diffs),
          "diffs": diffs}


def _pct(x: float) -> str:
  return f"{100 * x:.1f}"


def _col(p) -> str:
  return "accuracy" if p is None else f"p = {p:g}"


def table_markdown(rows: Sequence[dict]) -> str:
  """Three markdown tables: mean +- std (max), paper protocol, paired differences."""
  stats = summarize(rows)
  models = _order({m for m, _ in stats})
  strengths = sorted({p for _, p in stats}, key=_strength_key)
  head = "| model | " + " | ".join(_col(p) for p in strengths) + " |\n"
  rule = "|---|" + "---|" * len(strengths) + "\n"
  t1 = ("Test accuracy (%) at the last epoch, mean ± std over seeds [max over seeds]:\n\n"
        + head + rule)
  t2 = "Paper protocol: maximum over seeds of the best-epoch test accuracy (%):\n\n" + head + rule
  for m in models:
    c1, c2 = [], []
    for p in strengths:
      s = stats.get((m, p))
      c1.append("–" if s is None else
                f"{_pct(s['mean'])} ± {_pct(s['std'])} [{_pct(s['max_final'])}] (n={s['n']})")
      c2.append("–" if s is None else _pct(s["max_best"]))
    t1 += f"| {m} | " + " | ".join(c1) + " |\n"
    t2 += f"| {m} | " + " | ".join(c2) + " |\n"
  t3 = ("Paired differences (percentage points, same seed), mean ± std, and the seeds "
        "where the first model wins:\n\n| pair | " + " | ".join(_col(p) for p in strengths)
        + " |\n" + rule)
  any_pair = False
  for a, b in CLAIM_PAIRS:
    cells = [paired(rows, a, b, p) for p in strengths]
    if not any(cells):
      continue
    any_pair = True
    t3 += f"| {a} − {b} | " + " | ".join(
        "–" if d is None else f"{100 * d['mean']:+.1f} ± {100 * d['std']:.1f} "
        f"({d['wins']}/{d['n']})" for d in cells) + " |\n"
  return t1 + "\n" + t2 + ("\n" + t3 if any_pair else "")


def plot(rows: Sequence[dict], path: str, title: str = "") -> str:
  """Test accuracy vs confound strength, one line per model: mean ± std, seeds as dots.

  Real-data grids (no strength) draw one bar per model instead.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  stats = summarize(rows)
  models = _order({m for m, _ in stats})
  strengths = sorted({p for _, p in stats}, key=_strength_key)
  fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
  real = strengths == [None]
  n = len(models)
  for i, m in enumerate(models):
    ps = [p for p in strengths if (m, p) in stats]
    xs = np.asarray([0.0] if real else ps, np.float64)
    dx = (i - (n - 1) / 2) * (0.012 if not real else 0.0)  # separate the error bars
    means = [100 * stats[(m, p)]["mean"] for p in ps]
    stds = [100 * stats[(m, p)]["std"] for p in ps]
    if real:
      ax.bar(i, means[0], yerr=stds[0], capsize=4, label=m, alpha=0.8)
    else:
      ax.errorbar(xs + dx, means, yerr=stds, marker="o", capsize=3, label=m, lw=1.5)
    for p, x in zip(ps, [i] if real else xs + dx):
      accs = [100 * r["final_accuracy"] for r in rows if r["model"] == m and r["strength"] == p]
      ax.scatter([x] * len(accs), accs, s=9, color="k", alpha=0.35, zorder=3)
  if real:
    ax.set_xticks(range(n), models)
  else:
    ax.set_xlabel("confound strength p (train split; test split independent)")
    ax.set_xticks(strengths)
  ax.set_ylabel("test accuracy (%), last epoch")
  if rows and rows[0].get("settings", {}).get("data") == "synthetic":
    from qcs_jax.data.synthetic import CLASS_NAMES  # pylint: disable=import-outside-toplevel
    ax.axhline(100 / len(CLASS_NAMES), color="gray", ls="--", lw=1,
               label=f"chance (1/{len(CLASS_NAMES)})")
  seeds = max((s["n"] for s in stats.values()), default=0)
  ax.set_title(title or f"mean ± std over {seeds} seed(s); dots: single runs", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def write_report(rows: Sequence[dict], out: str) -> tuple[str, str]:
  """OUT/claim_table.md and OUT/claim.png from the rows."""
  if not rows:
    raise ValueError(f"{out}: no finished runs to report")
  settings = rows[0].get("settings", {})
  budget = sorted({r["images_through_backbone"] for r in rows})
  lines = [f"Settings: {', '.join(f'{k}={v}' for k, v in settings.items() if v not in ('', ()))}",
           f"Images through the backbone per run: {', '.join(map(str, budget))}", ""]
  table = os.path.join(out, "claim_table.md")
  with open(table, "w") as f:
    f.write("\n".join(lines) + "\n" + table_markdown(rows))
  return table, plot(rows, os.path.join(out, "claim.png"))

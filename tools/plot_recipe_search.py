"""Redraws docs/recipe_search.png from experiments/recipe_search.jsonl (issue 27's search).

  python tools/plot_recipe_search.py [--rows experiments/recipe_search.jsonl] [--png docs/recipe_search.png]

One line per trial (its first row; a trial of several seeds shows seed 3, the recipe's
weakest seed, when it has one), labelled with the trial's name and note.
"""
import argparse

from qcs_jax.experiments import claim_report, claim_store


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rows", default="experiments/recipe_search.jsonl")
  ap.add_argument("--png", default="docs/recipe_search.png")
  a = ap.parse_args()
  by_trial: dict[str, dict] = {}
  for r in claim_store.read_rows(a.rows):
    if r.get("epoch_accuracies") and r.get("final_accuracy") is not None:
      if r["trial"] not in by_trial or r.get("seed") == 3:
        by_trial[r["trial"]] = r
  rows = list(by_trial.values())
  label = lambda r: f"{r['trial']}: {r['model']} seed {r['seed']}, {r['note'].split(';')[0][:60]}"
  print(claim_report.plot_epochs(rows, a.png, label=label))


if __name__ == "__main__":
  main()

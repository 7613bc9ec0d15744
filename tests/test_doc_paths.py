"""Every repository path that README.md and docs/*.md cite exists (no stale file names)."""
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
# A path such as qcs_jax/apps/recognizer.py, tests/fixtures/x.json, docs/claim.png, configs/*.py,
# or a top-level file of the checkout.
PATH = re.compile(r"(?<![\w./-])((?:qcs_jax|tests|tools|docs|configs|\.ci)/[\w.*/-]*[\w*]"
                  r"|(?:constraints|requirements[\w-]*)\.txt|pyproject\.toml|Makefile)")
# A module named in backticks without its folder (`recognizer.py`, `apps/batch.py`).
MODULE = re.compile(r"`([A-Za-z][\w/]*\.py)[`:]")
EXTERNAL = {"models/ir50.py", "data_processing/sam.py"}  # the authors' code (github birdwcp/QCS)
# Cited before the branch that writes them is merged (issue 26: the reliability helper's).
PENDING: set[str] = set()


def cited_paths() -> dict[str, set[str]]:
  found: dict[str, set[str]] = {}
  for doc in DOCS:
    with open(os.path.join(ROOT, doc)) as f:
      for m in PATH.finditer(f.read()):
        path = m.group(1).rstrip(".")
        if "<" in path or path.endswith("/"):
          continue
        found.setdefault(path, set()).add(doc)
  return found


def exists(path: str) -> bool:
  full = os.path.join(ROOT, path)
  return bool(glob.glob(full)) if "*" in path else os.path.exists(full)


def test_every_cited_path_exists():
  cited = cited_paths()
  assert len(cited) > 30  # the pattern finds the docs' paths at all
  missing = {p: sorted(d) for p, d in cited.items() if not exists(p) and p not in PENDING}
  assert not missing, missing


def test_every_module_named_in_backticks_exists():
  tracked = [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "**", "*.py"),
                                                         recursive=True)
             if ".venv" not in p]
  stale = {}
  for doc in DOCS:
    with open(os.path.join(ROOT, doc)) as f:
      for name in MODULE.findall(f.read()):
        if name not in EXTERNAL and not any(t == name or t.endswith("/" + name)
                                            for t in tracked):
          stale.setdefault(name, set()).add(doc)
  assert not stale, stale

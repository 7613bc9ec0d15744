"""The catalogue of what the QCS authors released: ten model files and ir50.pth.

Each entry says which data set, model and recipe a file belongs to, its reported
test accuracy and where it is published, so `qcs-convert --zoo rafdb_qcs` picks
the right model config and class names for a downloaded file. Nothing here
downloads anything. Facts: the authors' README (github birdwcp/QCS); class orders
as their training scripts label their confusion matrices.
"""
from __future__ import annotations

import dataclasses

from qcs_jax import recipes
from qcs_jax.data import synthetic
from qcs_jax.data.readers.affectnet import AFFECTNET_CLASSES
from qcs_jax.data.readers.ferplus import FERPLUS_CLASS_NAMES
from qcs_jax.data.readers.rafdb import RAFDB_CLASSES

# Index -> name of each paper data set (the order the released models were trained with).
DATASET_CLASSES: dict[str, tuple[str, ...]] = {
    "rafdb": RAFDB_CLASSES,                 # RAF-DB labels 1..7 shifted to 0..6
    "ferplus": FERPLUS_CLASS_NAMES,         # the FERPlus vote columns' order
    "affectnet7": AFFECTNET_CLASSES[:7],    # AffectNet expression codes 0..6
    "affectnet8": AFFECTNET_CLASSES[:8],    # codes 0..7
}
DRIVE_FOLDER = "https://drive.google.com/drive/folders/{}"
DRIVE_FILE = "https://drive.google.com/file/d/{}"
SOURCE_REPO = "https://github.com/birdwcp/QCS"


@dataclasses.dataclass(frozen=True)
class Release:
  """One file the authors published."""
  name: str            # our catalogue key, e.g. 'rafdb_qcs'
  dataset: str         # 'rafdb' | 'ferplus' | 'affectnet7' | 'affectnet8' ('' for ir50)
  model: str           # 'qcs' | 'dcs' | 'ir50'
  accuracy: float | None  # reported test accuracy (%)
  drive_id: str        # Google Drive folder (checkpoints) or file (ir50.pth) id
  note: str = ""

  @property
  def url(self) -> str:
    fmt = DRIVE_FILE if self.model == "ir50" else DRIVE_FOLDER
    return fmt.format(self.drive_id)

  @property
  def class_names(self) -> tuple[str, ...]:
    return DATASET_CLASSES.get(self.dataset, ())

  @property
  def config_file(self) -> str:
    """The recipe that trains this model: configs/<dataset>[_dcs].py in a checkout
    (qcs_jax/recipes/<dataset>[_dcs].py in the package)."""
    if self.model == "ir50":
      return ""
    return f"configs/{self.dataset}{'_dcs' if self.model == 'dcs' else ''}.py"


_FT = "pre-trained on AffectNet-8, then fine-tuned (fine-tuning lr 3e-6)"
RELEASES: dict[str, Release] = {r.name: r for r in (
    Release("ir50", "", "ir50", None, "1FV8kUSeVbZ815iWt-YIYiQrCDChrhO2G",
            "IR50 on Ms-Celeb-1M: the backbone every recipe starts from "
            "(their scripts expect models/pretrain/ir50.pth)"),
    Release("rafdb_dcs", "rafdb", "dcs", 92.57, "1vv1WtDHj5DGDXFVt--_8NBxkAp8VF_73"),
    Release("rafdb_qcs", "rafdb", "qcs", 92.50, "1enyzfD1G8HPSPF1Tu6JkgMuirrKQs_mE"),
    Release("rafdb_qcs_ft", "rafdb", "qcs", 93.02, "1b25WkmbEqjC9dKsjIrGKUCxpywINjk5e", _FT),
    Release("ferplus_dcs", "ferplus", "dcs", 91.41, "1UoQ4xZYDGc0cooQd7BzhDfb58e3wwnjO"),
    Release("ferplus_qcs", "ferplus", "qcs", 91.41, "19O9BjP7Lhd1DX9r8-RxSmvO1aAUQHoBO"),
    Release("ferplus_qcs_ft", "ferplus", "qcs", 91.85, "15jqH56e2dVtJx0oPzzcAmvaDAFa0rc01",
            _FT),
    Release("affectnet7_dcs", "affectnet7", "dcs", 67.66, "1ch6144M9HuEbX9tSB0XrYbYxzNfuCZ0u"),
    Release("affectnet7_qcs", "affectnet7", "qcs", 67.94, "1fo9iyz6qLotOSUUCoGllGN-DiPqlHfp6"),
    Release("affectnet8_dcs", "affectnet8", "dcs", 64.40, "1_kXBuZxYXkHOQxUaUx12_oSyKoLU5puM"),
    Release("affectnet8_qcs", "affectnet8", "qcs", 64.30, "1WFbisNzL-YqqMNSN0sq8vIaXYuh4_1Xm"),
)}


def get(name: str) -> Release:
  """The catalogue entry `name`; a ValueError listing the names otherwise."""
  if name not in RELEASES:
    raise ValueError(f"unknown released model {name!r}; the catalogue has: "
                     f"{', '.join(RELEASES)}")
  return RELEASES[name]


def data_class_names(data_cfg) -> tuple[str, ...]:
  """Class names of a config's data set: a paper data set's, the synthetic faces', or
  config.data.class_names (folder / CSV data); () when the config does not say."""
  name = data_cfg.get("name", "")
  if name in DATASET_CLASSES:
    return DATASET_CLASSES[name]
  if name == "synthetic":
    return tuple(synthetic.CLASS_NAMES)
  names = data_cfg.get("class_names", ()) or ()
  if isinstance(names, str):
    names = [c.strip() for c in names.split(",") if c.strip()]
  return tuple(names)


def model_config(release: Release):
  """config.model of the recipe that trained `release` (the released model file's)."""
  if release.model == "ir50":
    raise ValueError("ir50 is a backbone: convert it without --full")
  return recipes.recipe(release.model, release.dataset).model


def table() -> str:
  """The catalogue as a plain-text table (for `qcs-convert --list_zoo`)."""
  rows = [f"{'name':16s} {'data set':11s} {'model':5s} {'acc %':>6s}  source"]
  for r in RELEASES.values():
    acc = f"{r.accuracy:.2f}" if r.accuracy is not None else "-"
    rows.append(f"{r.name:16s} {r.dataset or '-':11s} {r.model:5s} {acc:>6s}  {r.url}"
                + (f"  ({r.note})" if r.note else ""))
  return "\n".join(rows)

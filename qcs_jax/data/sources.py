"""Opening a data split by name: ``open_split(data_cfg, split)`` and training checks.

The source types live in ``qcs_jax.data.base`` and the readers (each validates
its files on open and returns a source; none prints) in
``qcs_jax.data.readers``: ``rafdb``, ``ferplus``, ``affectnet``, ``image_folder``,
``csv_manifest``. Both are re-exported here, with the readers' class-name constants.
"""
from __future__ import annotations

from typing import Any

# pylint: disable=unused-import
from qcs_jax.data.base import (DataError, FERSource, FileListSource, FileSource,
                               InMemorySource, LineOrigins, PixelSource, decode_rgb)
from qcs_jax.data.readers import affectnet as _affectnet, ferplus as _ferplus
from qcs_jax.data.readers import generic as _generic, rafdb as _rafdb
from qcs_jax.data.readers.affectnet import AFFECTNET_CLASSES, AFFECTNET_COLUMNS, affectnet
from qcs_jax.data.readers.parsing import ON_MISSING, _fast_rows, _resolve_option_path
from qcs_jax.data.readers.ferplus import (FERPLUS_CLASSES, FERPLUS_NF, FERPLUS_UNKNOWN,
                                          FERPLUS_VOTE_COLUMNS, ferplus, ferplus_majority_vote)
from qcs_jax.data.readers.generic import (IMAGE_EXTENSIONS, csv_manifest, folder_class_names,
                                          image_folder)
from qcs_jax.data.readers.rafdb import RAFDB_CLASSES, rafdb
# pylint: enable=unused-import
from qcs_jax.data import synthetic


# --- dispatch and checks ----------------------------------------------------------

# Where each data set comes from and the layout data.root must hold (none can be
# downloaded by this package: their licences require a request or an account).
DATA_HELP = {
    "rafdb": "RAF-DB is given out by its authors on request (http://www.whdeng.cn/RAF/"
             "model1.html); data.root holds basic/EmoLabel/list_patition_label.txt and "
             "basic/Image/aligned/*_aligned.jpg (or set data.list_train/list_test to QCS "
             "list files).",
    "ferplus": "FERPlus = the FER2013 images (fer2013.csv, Kaggle's 'Challenges in "
               "Representation Learning: Facial Expression Recognition Challenge') plus "
               "the FERPlus labels (fer2013new.csv, https://github.com/microsoft/FERPlus); "
               "data.root holds both files, or the FERPlus repo's FER2013Train/Valid/Test "
               "folders with label.csv and PNGs.",
    "affectnet7": "AffectNet is given out by its authors on request "
                  "(http://mohammadmahoor.com/affectnet/); data.root holds "
                  "Manually_Annotated_file_lists/{training,validation}.csv and "
                  "Manually_Annotated_Images/.",
    "folder": "data.root holds <split>/<class name>/*.jpg.",
}
DATA_HELP["affectnet8"] = DATA_HELP["affectnet7"]

DATASET_NAMES = ("rafdb", "ferplus", "affectnet7", "affectnet8", "folder", "csv", "synthetic")


def _class_names_option(value: Any) -> tuple[str, ...] | None:
  """class_names from a config: a sequence, or one comma-separated string (CLI flags)."""
  if value is None:
    return None
  if isinstance(value, str):
    names = tuple(c.strip() for c in value.split(",") if c.strip())
  else:
    names = tuple(str(c) for c in value)
  return names or None


def open_split(data_cfg: Any, split: str) -> FERSource:
  """Opens split ('train', 'test', ...) of the data set config.data names.

  Options read from data_cfg (with defaults): root, rafdb_variant ('aligned'),
  list_<split> (QCS list file for RAF-DB), fer2013_csv / ferplus_labels (paths of
  fer2013.csv / fer2013new.csv), csv (manifest path), class_names, on_missing
  ('error' | 'drop': listed images absent at open time), train_split.
  """
  get = data_cfg.get
  name = get("name", None)
  root = str(get("root", "") or "")
  on_missing = get("on_missing", "error") or "error"
  if name not in DATASET_NAMES:
    raise DataError(f"unknown data set data.name={name!r}; valid: {', '.join(DATASET_NAMES)}")
  if name == "synthetic":
    return synthetic.make_synthetic_split(get("synthetic", None), split)
  if name == "csv":
    csv_path = get("csv", "") or ""
    if not csv_path:
      raise DataError("data.name='csv' needs data.csv (path of a path,label,split manifest)")
    return _generic.csv_manifest(_resolve_option_path(csv_path, root), split,
                                _class_names_option(get("class_names", None)), on_missing)
  if not root:
    raise DataError(f"data.root is empty: set --config.data.root to your {name} folder. "
                    + DATA_HELP[name])
  if name == "rafdb":
    return _rafdb.rafdb(root, split, get("rafdb_variant", "aligned") or "aligned",
                       get(f"list_{split}", None) or None, on_missing)
  if name == "ferplus":
    return _ferplus.ferplus(root, split, get("fer2013_csv", None) or None,
                           get("ferplus_labels", None) or None, on_missing)
  if name in ("affectnet7", "affectnet8"):
    return _affectnet.affectnet(root, split, int(name[-1]), on_missing)
  class_names = _class_names_option(get("class_names", None))
  train_split = get("train_split", "train") or "train"
  if class_names is None and split != train_split:
    # Index classes as the training split does, even if this split lacks some.
    class_names = _generic.folder_class_names(root, train_split)
  return _generic.image_folder(root, split, class_names)


def validate_for_training(source: FERSource) -> list[str]:
  """Checks a training split for the branch sampler: warnings to print, DataError if unusable."""
  counts = source.class_counts()
  if len(source) == 0:
    raise DataError(f"{source.name}: the training split is empty")
  if source.num_classes < 2:
    raise DataError(f"{source.name}: training needs at least 2 classes (negatives come from "
                    f"other classes), got {list(source.class_names)}")
  empty = [n for n, c in zip(source.class_names, counts) if c == 0]
  if empty:
    raise DataError(f"{source.name}: no training images of class(es) {empty}; every class "
                    f"needs images (negatives are drawn per class). {source.summary()}")
  return [f"{source.name}: class {n!r} has a single training image; the sampler reuses it as "
          f"its own positive" for n, c in zip(source.class_names, counts) if c == 1]

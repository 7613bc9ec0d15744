"""Readers of the FER data sets, on tiny fixtures written in each official format."""
import os
import pickle
import sys
import types

import ml_collections
import numpy as np
from PIL import Image
import pytest

import qcs_jax.data
from qcs_jax.data import sources as S
from qcs_jax.data.sources import DataError

RED = (255, 0, 0)


def _img(path, color=RED, size=(6, 5), mode="RGB"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if mode == "L":
    Image.new("L", size, color).save(path)
  else:
    Image.new("RGB", size, color).save(path)
  return path


def _write(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  return path


def _assert_red(image):
  assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
  assert image[..., 0].min() > 200 and image[..., 1:].max() < 60


# --- RAF-DB -------------------------------------------------------------------

RAF_LINES = ["train_00001.jpg 1", "train_00002.jpg 4", "test_0001.jpg 2",
             "train_00003.jpg 7", "test_0002.jpg 7"]


def _rafdb(tmp_path, lines=RAF_LINES, original=False):
  root = str(tmp_path / "RAF")
  _write(os.path.join(root, "basic", "EmoLabel", "list_patition_label.txt"),
         "\n".join(lines) + "\n")
  for ln in lines:
    name = ln.split()[0]
    stem = name[:-4]
    _img(os.path.join(root, "basic", "Image", "aligned", f"{stem}_aligned.jpg"))
    if original:
      _img(os.path.join(root, "basic", "Image", "original", name), color=(0, 0, 255))
  return root


def test_rafdb_official_layout(tmp_path, capsys):
  root = _rafdb(tmp_path, original=True)
  train = S.rafdb(root, "train")
  assert train.name == "rafdb/train"
  assert train.class_names == S.RAFDB_CLASSES == (
      "Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral")
  np.testing.assert_array_equal(train.labels, [0, 3, 6])
  assert train.labels.dtype == np.int32
  item = train[1]
  _assert_red(item["image"])
  assert item["label"] == 3 and item["index"] == 1
  assert train.paths[0].endswith(os.path.join("aligned", "train_00001_aligned.jpg"))
  assert "line 2" in train.describe(1)

  test = S.rafdb(os.path.join(root, "basic"), "test")  # root = basic/ itself
  np.testing.assert_array_equal(test.labels, [1, 6])
  assert "Fear=1" in test.summary() and test.summary().startswith("rafdb/test: 2 images")

  orig = S.rafdb(root, "test", variant="original")
  assert orig.paths[0].endswith(os.path.join("original", "test_0001.jpg"))
  assert orig[0]["image"][..., 2].min() > 200  # the blue originals, not the aligned faces
  assert capsys.readouterr().out == ""  # readers print nothing


def test_rafdb_label_out_of_range_names_file_and_line(tmp_path):
  root = _rafdb(tmp_path, ["train_00001.jpg 1", "train_00002.jpg 8"])
  with pytest.raises(DataError, match=r"list_patition_label\.txt line 2: label 8"):
    S.rafdb(root, "train")
  root2 = _rafdb(tmp_path / "b", ["train_00001.jpg 0"])
  with pytest.raises(DataError, match="line 1: label 0"):
    S.rafdb(root2, "train")


def test_rafdb_bad_line_and_prefix(tmp_path):
  root = _rafdb(tmp_path, ["train_00001.jpg 1 extra"])
  with pytest.raises(DataError, match="line 1: expected"):
    S.rafdb(root, "train")
  root2 = _rafdb(tmp_path / "b", ["train_00001.jpg 1", "val_001.jpg 2"])
  with pytest.raises(DataError, match="line 2.*neither 'train_' nor 'test_'"):
    S.rafdb(root2, "train")


def test_rafdb_missing_image_says_layout_and_what_was_found(tmp_path):
  root = _rafdb(tmp_path)
  missing = os.path.join(root, "basic", "Image", "aligned", "train_00002_aligned.jpg")
  os.remove(missing)
  with pytest.raises(DataError) as e:
    S.rafdb(root, "train")
  msg = str(e.value)
  assert "1 of 3" in msg and "line 2" in msg and missing in msg
  assert "<stem>_aligned.jpg" in msg and "train_00001_aligned.jpg" in msg  # expected + found
  dropped = S.rafdb(root, "train", on_missing="drop")
  np.testing.assert_array_equal(dropped.labels, [0, 6])
  assert "dropped 1 missing" in dropped.summary()
  with pytest.raises(DataError, match="original"):  # no original/ folder at all
    S.rafdb(root, "test", variant="original")


def test_undecodable_list_file(tmp_path):
  root = _rafdb(tmp_path)
  with open(os.path.join(root, "basic", "EmoLabel", "list_patition_label.txt"), "wb") as f:
    f.write(b"train_00001.jpg 1\n\xff\xfe 2\n")
  with pytest.raises(DataError, match="list_patition_label.txt"):
    S.rafdb(root, "train")
  bad = tmp_path / "bad.csv"
  bad.write_bytes(b"Usage,Image name\n\xff,\xfe\n")
  with pytest.raises(DataError, match="bad.csv"):
    list(S._fast_rows(str(bad)))


def test_rafdb_no_label_file(tmp_path):
  with pytest.raises(DataError, match="list_patition_label.txt"):
    S.rafdb(str(tmp_path), "train")
  with pytest.raises(DataError, match="unknown split"):
    S.rafdb(str(tmp_path), "valid")


def test_rafdb_qcs_list_file(tmp_path):
  root = _rafdb(tmp_path)
  lst = _write(str(tmp_path / "raf_db_basic_train.txt"),
               "basic/Image/aligned/train_00001_aligned.jpg 0\n\n"
               "basic/Image/aligned/train_00003_aligned.jpg 6\n")
  src = S.rafdb(root, "train", list_file=lst)
  np.testing.assert_array_equal(src.labels, [0, 6])
  assert "line 3" in src.describe(1)
  _assert_red(src[1]["image"])

  bad = _write(str(tmp_path / "bad.txt"), "basic/Image/aligned/train_00001_aligned.jpg 7\n")
  with pytest.raises(DataError, match=r"bad\.txt line 1: label 7 is outside 0\.\.6"):
    S.rafdb(root, "train", list_file=bad)


def test_rafdb_list_paths_not_under_root(tmp_path):
  root = _rafdb(tmp_path)
  lst = _write(str(tmp_path / "l.txt"), "Image/aligned/train_00001_aligned.jpg 0\n")
  with pytest.raises(DataError) as e:
    S.rafdb(root, "train", list_file=lst)
  assert "resolved against data root" in str(e.value) and "l.txt line 1" in str(e.value)


def test_corrupt_image_raises_with_path(tmp_path):
  root = _rafdb(tmp_path)
  bad = os.path.join(root, "basic", "Image", "aligned", "train_00002_aligned.jpg")
  with open(bad, "wb") as f:
    f.write(b"not a jpeg at all")
  src = S.rafdb(root, "train")  # existence is checked on open, decoding on access
  with pytest.raises(DataError) as e:
    src[1]
  assert bad in str(e.value) and "line 2" in str(e.value)
  _assert_red(src[0]["image"])


def test_file_source_pickles(tmp_path):
  src = S.rafdb(_rafdb(tmp_path), "train")
  again = pickle.loads(pickle.dumps(src))
  np.testing.assert_array_equal(again.labels, src.labels)
  assert again.describe(2) == src.describe(2)


# --- FERPlus majority vote -----------------------------------------------------

def _vote_reference(row):
  """Plain-Python restatement of the FERPlus rule, for cross-checking."""
  v = [0 if c <= 1 else c for c in row]
  total, top = sum(v), max(v)
  return v.index(top) if top > 0.5 * total else S.FERPLUS_UNKNOWN


def test_ferplus_majority_vote_hand_rows():
  rows = {
      # (neutral..contempt, unknown, NF): expected
      (6, 1, 0, 0, 0, 0, 0, 0, 0, 0): 0,       # clear majority
      (4, 4, 0, 0, 0, 0, 0, 0, 0, 0): 8,       # tie -> unknown
      (5, 1, 1, 1, 1, 1, 0, 0, 0, 0): 0,       # 5 of 10 raw, but single votes are outliers
      (4, 2, 2, 0, 0, 0, 0, 0, 0, 0): 8,       # exactly half is not a majority
      (0, 2, 0, 0, 0, 0, 0, 0, 7, 1): 8,       # 'unknown' column wins
      (0, 0, 0, 0, 0, 0, 0, 0, 0, 10): 9,      # NF wins
      (4, 0, 0, 0, 0, 0, 0, 0, 2, 3): 8,       # unknown + NF votes count in the total
      (1, 1, 1, 1, 1, 1, 1, 1, 1, 1): 8,       # nothing left after outlier removal
      (0, 0, 0, 0, 0, 0, 0, 3, 0, 2): 7,       # contempt
      (0, 0, 0, 2, 0, 0, 9, 0, 0, 0): 6,       # fear
  }
  got = S.ferplus_majority_vote(np.array(list(rows)))
  np.testing.assert_array_equal(got, list(rows.values()))
  rng = np.random.default_rng(0)
  rand = rng.integers(0, 6, size=(500, 10))
  np.testing.assert_array_equal(S.ferplus_majority_vote(rand), [_vote_reference(list(r))
                                                                for r in rand])
  with pytest.raises(DataError):
    S.ferplus_majority_vote(np.zeros((2, 8)))


# --- FERPlus CSVs ----------------------------------------------------------------

NEW_HEADER = ("Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,"
              "contempt,unknown,NF")
FER_ROWS = [  # usage, image name, votes, pixel base value
    ("Training", "fer0000000.png", "0,9,0,0,1,0,0,0,0,0", 10),   # happiness
    ("Training", "", "10,0,0,0,0,0,0,0,0,0", 20),                # dropped by FERPlus
    ("Training", "fer0000002.png", "5,5,0,0,0,0,0,0,0,0", 30),   # tie -> unknown
    ("Training", "fer0000003.png", "0,0,0,0,0,0,0,0,0,10", 40),  # NF
    ("Training", "fer0000004.png", "0,0,0,0,0,0,0,6,0,1", 50),   # contempt
    ("PublicTest", "fer0000005.png", "0,0,8,0,0,0,0,0,2,0", 60),  # surprise
    ("PrivateTest", "fer0000006.png", "0,0,0,7,0,0,0,0,0,0", 70),  # sadness
    ("PrivateTest", "fer0000007.png", "0,0,0,0,7,0,0,0,0,0", 80),  # anger
]


def _pixels(base, n=2304):
  return " ".join(str((base + i) % 256) for i in range(n))


def _fer_csvs(root, rows=FER_ROWS, drop_new_last=False, short_pixels_row=None,
              new_header=NEW_HEADER):
  old = ["emotion,pixels,Usage"]
  new = [new_header]
  for i, (usage, name, votes, base) in enumerate(rows):
    n = 2303 if i == short_pixels_row else 2304
    old.append(f"0,{_pixels(base, n)},{usage}")
    new.append(f"{usage},{name},{votes}")
  if drop_new_last:
    new.pop()
  _write(os.path.join(root, "fer2013.csv"), "\n".join(old) + "\n")
  _write(os.path.join(root, "fer2013new.csv"), "\n".join(new) + "\n")
  return root


def test_ferplus_csv_layout(tmp_path, capsys):
  root = _fer_csvs(str(tmp_path))
  train = S.ferplus(root, "train")
  assert isinstance(train, S.InMemorySource) and train.name == "ferplus/train"
  assert train.class_names == ("Neutral", "Happiness", "Surprise", "Sadness", "Anger",
                               "Disgust", "Fear", "Contempt")
  np.testing.assert_array_equal(train.labels, [1, 7])
  img = train[1]["image"]
  assert img.shape == (48, 48, 3) and img.dtype == np.uint8
  np.testing.assert_array_equal(img[..., 0], img[..., 2])  # grey replicated
  expected = (50 + np.arange(2304)) % 256  # row 5 (contempt) kept its own pixels
  np.testing.assert_array_equal(img[..., 1].reshape(-1), expected)
  assert "fer2013.csv line 6" in train.describe(1)
  s = train.summary()
  assert "dropped 1 without image name" in s and "1 unknown" in s and "1 not-a-face" in s

  valid = S.ferplus(root, "valid")
  np.testing.assert_array_equal(valid.labels, [2])
  assert valid[0]["image"][0, 0, 0] == 60
  test = S.ferplus(root, "test")
  np.testing.assert_array_equal(test.labels, [3, 4])
  assert test[1]["image"][0, 1, 1] == 81
  assert capsys.readouterr().out == ""


def test_ferplus_csv_row_count_mismatch_names_files(tmp_path):
  root = _fer_csvs(str(tmp_path), drop_new_last=True)
  with pytest.raises(DataError) as e:
    S.ferplus(root, "train")
  msg = str(e.value)
  assert "fer2013.csv has 8" in msg and "fer2013new.csv has 7" in msg


def test_ferplus_csv_wrong_pixel_count_names_line(tmp_path):
  root = _fer_csvs(str(tmp_path), short_pixels_row=4)
  with pytest.raises(DataError, match=r"fer2013\.csv line 6: pixels column has 2303 values"):
    S.ferplus(root, "train")


def test_ferplus_csv_checks_columns_and_alignment(tmp_path):
  root = _fer_csvs(str(tmp_path / "a"), new_header=NEW_HEADER.replace(",NF", ",nonface"))
  with pytest.raises(DataError, match=r"fer2013new\.csv: missing column\(s\) \['NF'\]"):
    S.ferplus(root, "train")
  rows = list(FER_ROWS)
  rows[2] = ("Training", "fer0000002.png", "x,5,0,0,0,0,0,0,0,0", 30)
  root = _fer_csvs(str(tmp_path / "b"), rows=rows)
  with pytest.raises(DataError, match=r"fer2013new\.csv line 4: vote count neutral='x'"):
    S.ferplus(root, "train")
  root = _fer_csvs(str(tmp_path / "c"))
  new = open(os.path.join(root, "fer2013new.csv")).read().replace("PublicTest", "Training")
  _write(os.path.join(root, "fer2013new.csv"), new)
  with pytest.raises(DataError, match="do not line up"):
    S.ferplus(root, "train")


def _fer_folder(root, split_folder, rows):
  folder = os.path.join(root, split_folder)
  lines = []
  for name, votes, grey in rows:
    _img(os.path.join(folder, name), color=grey, size=(48, 48), mode="L")
    lines.append(f'{name},"(0, 0, 48, 48)",{votes}')
  _write(os.path.join(folder, "label.csv"), "\n".join(lines) + "\n")
  return folder


def test_ferplus_folder_layout(tmp_path):
  root = str(tmp_path / "FERPlus")
  _fer_folder(os.path.join(root, "data"), "FER2013Train", [
      ("fer0000000.png", "0,0,0,0,0,0,8,2,0,0", 90),   # fear
      ("fer0000001.png", "3,3,0,0,0,0,0,0,0,0", 91),   # tie: dropped
      ("fer0000002.png", "9,1,0,0,0,0,0,0,0,0", 92)])  # neutral
  _fer_folder(os.path.join(root, "data"), "FER2013Valid", [
      ("fer0000003.png", "0,0,0,0,0,4,0,0,0,1", 93)])  # disgust
  train = S.ferplus(root, "train")  # the repo root, folders under data/
  np.testing.assert_array_equal(train.labels, [6, 0])
  img = train[1]["image"]
  assert img.shape == (48, 48, 3) and (img == 92).all()
  assert "label.csv line 3" in train.describe(1) and "1 unknown" in train.summary()
  valid = S.ferplus(os.path.join(root, "data"), "val")
  np.testing.assert_array_equal(valid.labels, [5])
  with pytest.raises(DataError, match="found neither layout"):
    S.ferplus(root, "test")

  os.remove(os.path.join(root, "data", "FER2013Train", "fer0000002.png"))
  with pytest.raises(DataError, match=r"(?s)1 of 2 listed images are missing.*line 3"):
    S.ferplus(root, "train")


# --- AffectNet -----------------------------------------------------------------

AFF_HEADER = ("subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,"
              "expression,valence,arousal")


def _aff_row(path, expr):
  return f'{path},10,10,50,50,"1.0;2.0;3.0;4.0",{expr},0.1,-0.2'


def _affectnet(root, train_exprs=(0, 1, 7, 8, 10, 6), val_exprs=(3, 7), header_val=False,
               images_under="Manually_Annotated_Images"):
  lists = os.path.join(root, "Manually_Annotated_file_lists")
  rows = []
  for i, e in enumerate(train_exprs):
    rel = f"{i % 2 + 1}/img{i}.jpg"
    _img(os.path.join(root, images_under, rel))
    rows.append(_aff_row(rel, e))
  _write(os.path.join(lists, "training.csv"), "\n".join([AFF_HEADER] + rows) + "\n")
  rows = []
  for i, e in enumerate(val_exprs):
    rel = f"9/val{i}.png"
    _img(os.path.join(root, images_under, rel))
    rows.append(_aff_row(rel, e))
  _write(os.path.join(lists, "validation.csv"),
         "\n".join(([AFF_HEADER] if header_val else []) + rows) + "\n")
  return root


def test_affectnet_7_and_8(tmp_path):
  root = _affectnet(str(tmp_path))
  a7 = S.affectnet(root, "train", 7)
  assert a7.name == "affectnet7/train"
  assert a7.class_names == ("Neutral", "Happy", "Sad", "Surprise", "Fear", "Disgust", "Anger")
  np.testing.assert_array_equal(a7.labels, [0, 1, 6])
  assert "training.csv line 7" in a7.describe(2)
  assert "dropped 3 rows" in a7.summary()
  _assert_red(a7[0]["image"])
  a8 = S.affectnet(root, "train", 8)
  assert a8.class_names[-1] == "Contempt"
  np.testing.assert_array_equal(a8.labels, [0, 1, 7, 6])
  test = S.affectnet(root, "test", 8)  # validation.csv without its header row
  np.testing.assert_array_equal(test.labels, [3, 7])
  assert test.name == "affectnet8/test" and "validation.csv line 2" in test.describe(1)


def test_affectnet_images_directly_under_root(tmp_path):
  root = _affectnet(str(tmp_path), images_under="", header_val=True)
  np.testing.assert_array_equal(S.affectnet(root, "test", 7).labels, [3])


def test_affectnet_missing_images_counted_with_lines(tmp_path):
  root = _affectnet(str(tmp_path))
  for rel in ("1/img0.jpg", "2/img5.jpg"):
    os.remove(os.path.join(root, "Manually_Annotated_Images", rel))
  with pytest.raises(DataError) as e:
    S.affectnet(root, "train", 7)
  msg = str(e.value)
  assert "2 of 3 listed images are missing" in msg
  assert "training.csv line 2" in msg and "training.csv line 7" in msg
  assert "Manually_Annotated_Images" in msg
  kept = S.affectnet(root, "train", 7, on_missing="drop")
  np.testing.assert_array_equal(kept.labels, [1])


def test_affectnet_bad_expression_and_layout(tmp_path):
  root = _affectnet(str(tmp_path), train_exprs=(0, 11))
  with pytest.raises(DataError, match=r"training\.csv line 3: expression 11"):
    S.affectnet(root, "train", 7)
  with pytest.raises(DataError, match="num_classes must be 7 or 8"):
    S.affectnet(root, "train", 5)
  with pytest.raises(DataError, match="training.csv not found"):
    S.affectnet(str(tmp_path / "nothing"), "train", 7)


# --- image folder and CSV manifest -------------------------------------------------

def _folder(root):
  _img(os.path.join(root, "train", "sad", "a.png"), color=(0, 255, 0))
  _img(os.path.join(root, "train", "happy", "b.jpg"))
  _img(os.path.join(root, "train", "happy", "sub", "c.JPEG"))
  _write(os.path.join(root, "train", "happy", "notes.txt"), "not an image")
  _img(os.path.join(root, "test", "sad", "d.bmp"), color=(0, 255, 0))
  return root


def test_image_folder(tmp_path):
  root = _folder(str(tmp_path))
  train = S.image_folder(root, "train")
  assert train.class_names == ("happy", "sad") and train.name == "folder/train"
  np.testing.assert_array_equal(train.labels, [0, 0, 1])
  _assert_red(train[0]["image"])
  assert train[2]["image"][..., 1].min() > 200
  # A test split with only 'sad': alone it would be class 0; the train class list fixes it.
  assert S.image_folder(root, "test").labels.tolist() == [0]
  fixed = S.image_folder(root, "test", class_names=("happy", "sad"))
  assert fixed.labels.tolist() == [1]
  with pytest.raises(DataError, match=r"class folder\(s\) \['sad'\] not in class_names"):
    S.image_folder(root, "test", class_names=("happy",))


def test_image_folder_without_class_folders(tmp_path):
  root = str(tmp_path)
  _img(os.path.join(root, "train", "x.jpg"))
  with pytest.raises(DataError) as e:
    S.image_folder(root, "train")
  msg = str(e.value)
  assert "no class sub-folders" in msg and "<class_name>" in msg and "1 images directly" in msg
  with pytest.raises(DataError, match="does not exist"):
    S.image_folder(root, "test")


def test_csv_manifest(tmp_path):
  root = _folder(str(tmp_path / "imgs"))
  man = _write(str(tmp_path / "imgs" / "m.csv"),
               "path,label,split\ntrain/sad/a.png,sad,train\n"
               f"{os.path.join(root, 'train', 'happy', 'b.jpg')},happy,train\n"
               "test/sad/d.bmp,sad,test\n")
  train = S.csv_manifest(man, "train")
  assert train.class_names == ("happy", "sad") and train.name == "csv/train"
  np.testing.assert_array_equal(train.labels, [1, 0])
  assert train[0]["image"][..., 1].min() > 200 and "m.csv line 2" in train.describe(0)
  test = S.csv_manifest(man, "test", class_names=("sad", "happy"))
  assert test.labels.tolist() == [0]

  ints = _write(str(tmp_path / "imgs" / "i.csv"),
                "split,path,label\ntrain,train/sad/a.png,2\ntest,test/sad/d.bmp,0\n")
  src = S.csv_manifest(ints, "train")
  assert src.class_names == ("0", "1", "2") and src.labels.tolist() == [2]
  with pytest.raises(DataError, match="no rows with split 'valid'"):
    S.csv_manifest(ints, "valid")


def test_csv_manifest_errors(tmp_path):
  root = _folder(str(tmp_path))
  mixed = _write(os.path.join(root, "mixed.csv"),
                 "path,label,split\ntrain/sad/a.png,1,train\ntrain/happy/b.jpg,happy,train\n")
  with pytest.raises(DataError, match="line 2.*line 3"):
    S.csv_manifest(mixed, "train")
  rng = _write(os.path.join(root, "range.csv"),
               "path,label,split\ntrain/sad/a.png,1,train\ntrain/happy/b.jpg,5,train\n")
  with pytest.raises(DataError, match=r"range\.csv line 3: label 5 is outside 0\.\.1"):
    S.csv_manifest(rng, "train", class_names=("happy", "sad"))
  miss = _write(os.path.join(root, "miss.csv"),
                "path,label,split\ntrain/sad/a.png,0,train\ntrain/sad/zz.png,0,train\n")
  with pytest.raises(DataError, match=r"miss\.csv line 3.*zz\.png"):
    S.csv_manifest(miss, "train")
  cols = _write(os.path.join(root, "cols.csv"), "file,label,split\na.png,0,train\n")
  with pytest.raises(DataError, match=r"missing column\(s\) \['path'\]"):
    S.csv_manifest(cols, "train")


# --- open_split and validate_for_training ----------------------------------------------

def _cfg(**kw):
  return ml_collections.ConfigDict(dict(train_split="train", test_split="test", **kw))


def test_open_split_dispatch(tmp_path, monkeypatch):
  raf = _rafdb(tmp_path / "raf")
  assert S.open_split(_cfg(name="rafdb", root=raf), "test").labels.tolist() == [1, 6]
  _write(os.path.join(raf, "tr.txt"), "basic/Image/aligned/train_00001_aligned.jpg 4\n")
  cfg = _cfg(name="rafdb", root=raf, list_train="tr.txt", list_test="")
  assert S.open_split(cfg, "train").labels.tolist() == [4]  # list path relative to root
  assert len(S.open_split(cfg, "test")) == 2  # empty list_test: official layout

  folder = _folder(str(tmp_path / "f"))
  assert S.open_split(_cfg(name="folder", root=folder), "test").labels.tolist() == [1]
  empty = _cfg(name="folder", root=folder, class_names=[])  # as config.py's default ()
  assert S.open_split(empty, "test").labels.tolist() == [1]
  plain = dict(name="folder", root=folder, class_names=("sad", "happy"))  # a dict works too
  assert S.open_split(plain, "test").labels.tolist() == [0]
  man = _write(os.path.join(folder, "m.csv"), "path,label,split\ntrain/sad/a.png,sad,train\n")
  src = S.open_split(_cfg(name="csv", root="", csv=man, class_names="happy,sad"), "train")
  assert src.labels.tolist() == [1]
  fer = _fer_csvs(str(tmp_path / "fer"))
  assert S.open_split(_cfg(name="ferplus", root=fer), "test").labels.tolist() == [3, 4]
  aff = _affectnet(str(tmp_path / "aff"))
  assert S.open_split(_cfg(name="affectnet8", root=aff), "train").num_classes == 8

  calls = []
  fake = types.ModuleType("qcs_jax.data.synthetic")
  fake.make_synthetic_split = lambda c, split: calls.append((c.num_train, split)) or "ok"
  monkeypatch.setitem(sys.modules, "qcs_jax.data.synthetic", fake)
  monkeypatch.setattr(S, "synthetic", fake)  # sources imports it at its top
  cfg = _cfg(name="synthetic", synthetic=dict(num_train=7))
  assert S.open_split(cfg, "train") == "ok" and calls == [(7, "train")]

  with pytest.raises(DataError) as e:
    S.open_split(_cfg(name="imagenet", root=raf), "train")
  for n in ("rafdb", "ferplus", "affectnet7", "affectnet8", "folder", "csv", "synthetic"):
    assert n in str(e.value)
  with pytest.raises(DataError, match="data.root is empty"):
    S.open_split(_cfg(name="rafdb", root=""), "train")


def test_validate_for_training():
  def src(labels, k=3):
    return S.InMemorySource(labels=np.array(labels), class_names=("a", "b", "c")[:k],
                            name="x/train", images=np.zeros((len(labels), 2, 2, 3), np.uint8))
  assert S.validate_for_training(src([0, 0, 1, 1, 2, 2])) == []
  warns = S.validate_for_training(src([0, 0, 1, 2, 2]))
  assert len(warns) == 1 and "'b'" in warns[0] and "single" in warns[0]
  with pytest.raises(DataError, match=r"class\(es\) \['c'\]"):
    S.validate_for_training(src([0, 0, 1, 1]))
  with pytest.raises(DataError, match="at least 2 classes"):
    S.validate_for_training(src([0, 0], k=1))

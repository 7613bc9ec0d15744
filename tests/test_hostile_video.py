"""A video whose frames stop decoding halfway: frames before it, then one line naming the frame."""
from __future__ import annotations

import numpy as np
import pytest

from qcs_jax.data.base import DataError
from qcs_jax.data.video import VideoFrames

N = 30


@pytest.fixture(scope="module")
def video(tmp_path_factory):
  import cv2
  path = tmp_path_factory.mktemp("video") / "clip.avi"
  w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
  rng = np.random.default_rng(0)
  for _ in range(N):
    w.write(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
  w.release()
  return path


def test_whole_video_has_no_problem(video):
  frames = VideoFrames(str(video), every=3)
  got = list(frames)
  assert [i for i, _, _ in got] == list(range(0, N, 3))
  assert got[1][1] == pytest.approx(0.3) and got[0][2].shape == (48, 64, 3)
  assert frames.declared == N and frames.frames_read == N and frames.problem is None


@pytest.mark.parametrize("damage", ["truncated", "zeroed"])
def test_frames_stop_decoding_halfway(video, tmp_path, damage):
  data = bytearray(video.read_bytes())
  half = len(data) // 2
  if damage == "truncated":
    data = data[:half]
  else:
    data[half:half + len(data) // 4] = bytes(len(data) // 4)
  bad = tmp_path / f"{damage}.avi"
  bad.write_bytes(bytes(data))
  frames = VideoFrames(str(bad))
  got = list(frames)
  assert 0 < len(got) < N - 2
  assert frames.problem == (
      f"{bad}: frame {len(got)} of {N} could not be decoded; the remaining {N - len(got)} "
      "frames were skipped (damaged or truncated file)")


def test_unreadable_videos_name_the_file(tmp_path):
  for name, data in (("empty.mp4", b""), ("text.mp4", b"not a video at all\n" * 10)):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(DataError, match=f"{tmp_path / name}: (empty file|cannot open)"):
      list(VideoFrames(str(tmp_path / name)))
  with pytest.raises(DataError, match="no such video file"):
    list(VideoFrames(str(tmp_path / "missing.mp4")))

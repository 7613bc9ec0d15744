"""tools/benchmark.py (qcs_jax.bench) end to end on a small network: both frameworks, one inference
batch and one SAM train step, the same weights on both sides."""
import json
import os
import subprocess
import sys

import pytest

from qcs_jax.bench import cli, e2e, report, runner, workload as common
from qcs_jax.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench") / "bench.json"
  cmd = [sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "--framework", "both",
         "--model", "dcs", "--width", "small", "--img_size", "32", "--batch", "2",
         "--infer_batch", "3", "--steps", "2", "--warmup", "1", "--threads", "1",
         "--json", str(out), "--markdown", "--extra", "torch:float32:channels_last"]
  # This checkout's qcs_jax, whatever copy the virtualenv has installed.
  path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path)
  done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  with open(out) as f:
    return json.load(f), done.stdout


def test_both_frameworks_compute_the_same_thing(bench_json):
  saved, _ = bench_json
  rows = {(r["contender"], r["key"]): r for r in saved["rows"]}
  cl = "torch[channels_last]"
  assert set(rows) == {(fw, key) for fw in ("jax", "torch", cl) for key in ("train", "infer:3")}
  # The first train loss (before any update) and logits[0, 0] of inference agree.
  for key in ("train", "infer:3"):
    t = rows[("torch", key)]["first_loss"]
    for other in ("jax", cl):
      j = rows[(other, key)]["first_loss"]
      assert abs(j - t) <= 1e-4 * max(1.0, abs(t)), (key, other, j, t)
  assert "channels_last" in rows[(cl, "train")]["versions"]
  assert rows[("jax", "train")]["images"] == 4  # DCS: 2 anchors x 2 branches
  ram_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
  for r in saved["rows"]:  # the figures agree with each other and with what a process can be
    assert r["ms_min"] <= r["ms_per_step"] <= r["ms_max"], r
    assert r["images_per_s"] == pytest.approx(r["images"] / (r["ms_per_step"] / 1e3), rel=1e-9)
    assert 0 <= r["step_mem_mib"] <= r["rss_peak_mib"], r
    assert 50 < r["rss_peak_mib"] < ram_mib, r  # a Python with numpy and jax or torch
    assert 0 < r["cpu_s_per_step"] and len(r["warmup_ms"]) == 1
  assert rows[("jax", "train")]["flops"] > 0  # XLA cost analysis


def test_markdown_rows_name_machine_versions_and_date(bench_json):
  saved, stdout = bench_json
  assert report.MD_HEADER.splitlines()[0] in stdout
  md = [l for l in stdout.splitlines() if l.startswith(f"| {saved['date']} |")]
  assert len(md) == 6
  assert any("torch 2." in l for l in md) and any("jax 0." in l for l in md)
  assert all("dcs small 32px float32" in l for l in md)


def test_summary_figures_are_the_measured_ones():
  """report.summarize on known step records: median, rate, extremes, memory, first loss."""
  class C:  # a contender's description, as runner passes it
    name, framework, xla_flags, dtype, hello = "jax", "jax", "", "float32", {}

  mib = 2**20
  steps = [dict(wall_s=w, cpu_s=2 * w, rss_peak=p * mib, rss_start=s * mib, loss=l)
           for w, p, s, l in ((0.30, 500, 480, 2.0), (0.10, 520, 490, 1.9), (0.14, 510, 505, 1.8))]
  warm = [dict(wall_s=1.5, cpu_s=3.0, rss_peak=600 * mib, rss_start=100 * mib, loss=2.5)]
  r = report.summarize("train", C, dict(images=8, flops=4e9), steps, warm, "float32")
  # The median step (the mean, 180 ms, would hide a slow outlier's effect differently).
  assert r["ms_per_step"] == pytest.approx(140.0) and r["images_per_s"] == pytest.approx(8 / 0.14)
  assert (r["ms_min"], r["ms_max"]) == pytest.approx((100.0, 300.0))
  assert r["cpu_s_per_step"] == pytest.approx(0.28) and r["warmup_ms"] == [1500]
  assert r["rss_peak_mib"] == 600 and r["step_mem_mib"] == 30 and r["first_loss"] == 2.5
  assert r["gflop_per_image"] == pytest.approx(0.5) and r["achieved_flops"] == pytest.approx(4e9 / 0.14)
  assert "mfu" not in r  # CPU rows have no peak to compare with


def test_gpu_peak_table():
  assert common.gpu_peak("NVIDIA H100 80GB HBM3")["bf16"] == pytest.approx(989.4e12)
  assert common.gpu_peak("NVIDIA H100 PCIe")["bf16"] == pytest.approx(756e12)
  assert common.gpu_peak("NVIDIA H200")["tf32"] == pytest.approx(494.7e12)
  assert common.gpu_peak("cpu") is None


def test_roofline_reports_the_best_gemm_rate(capsys, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # main() appends to it
  cli.main(["--roofline", "--roofline_sizes", "128,256", "--steps", "2",
                  "--threads", "1"])
  out = capsys.readouterr().out
  rates = [float(l.split(":")[1].split()[0]) for l in out.splitlines() if "GEMM:" in l]
  assert len(rates) == 4 and all(r > 0 for r in rates)  # 2 sizes x 2 frameworks
  best = [l for l in out.splitlines() if l.startswith("attainable float32 rate")]
  assert len(best) == 1 and f"{max(rates):.1f} GFLOP/s" in best[0]


def test_extra_contenders_parse_and_reject_nonsense():
  args = cli.parse_args(["--framework", "both", "--extra", "torch:float32:channels_last",
                         "--extra", "jax:bfloat16", "--extra", "torch:bfloat16"])
  got = [(c.name, c.framework, c.dtype, c.channels_last) for c in runner.make_contenders(args)]
  assert got == [("jax", "jax", "float32", False), ("torch", "torch", "float32", False),
                 ("torch[channels_last]", "torch", "float32", True),
                 ("jax[bf16]", "jax", "bfloat16", False), ("torch[bf16]", "torch", "bfloat16", False)]
  for bad in ("jax:bfloat16:channels_last", "torch:float16", "tf", "torch:float32:nhwc"):
    with pytest.raises(ValueError, match="--extra"):
      runner.parse_extra(bad)


def test_e2e_benchmark_writes_a_rafdb_the_real_reader_opens(tmp_path):
  """tools/benchmark_e2e.py feeds the RAF-DB recipe from JPEG files in the official layout."""
  e2e.write_rafdb(str(tmp_path), num_train=9, num_test=3, size=40)
  cfg = e2e.recipe_config("rafdb", str(tmp_path), batch=2, dtype="bfloat16", width="paper",
                          workers=0)
  assert cfg.model.dtype == "bfloat16" and cfg.data.batch_size == 2
  train = sources.open_split(cfg.data, "train")
  test = sources.open_split(cfg.data, "test")
  assert (len(train), len(test)) == (9, 3)
  assert list(train.labels) == [i % 7 for i in range(9)]
  assert train[4]["image"].shape == (40, 40, 3)

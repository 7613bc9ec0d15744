"""Rows of a benchmark run: summary per contender, console table, markdown rows."""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
from typing import Any, Optional

from qcs_jax.bench.workload import gpu_peak, machine_line


def summarize(key: str, c: Any, prep: dict, steps: list[dict], warm: list[dict],
              dtype: str) -> dict:
  walls = [s["wall_s"] for s in steps]
  cpus = [s["cpu_s"] for s in steps]
  med = statistics.median(walls)
  row = dict(contender=c.name, framework=c.framework, key=key, images=prep["images"],
             ms_per_step=1e3 * med, images_per_s=prep["images"] / med,
             ms_min=1e3 * min(walls), ms_max=1e3 * max(walls),
             cpu_s_per_step=statistics.median(cpus),
             rss_peak_mib=max(s["rss_peak"] for s in steps + warm) / 2**20,
             step_mem_mib=max(s["rss_peak"] - s["rss_start"] for s in steps) / 2**20,
             first_loss=warm[0]["loss"] if warm else steps[0]["loss"],
             warmup_ms=[round(1e3 * w["wall_s"]) for w in warm],
             versions=c.hello.get("versions", ""), device_kind=c.hello.get("device_kind", ""),
             platform=c.hello.get("platform", ""), xla_flags=c.xla_flags,
             dtype=getattr(c, "dtype", dtype))
  for k in ("lower_s", "compile_s", "flops", "xla_bytes", "torch_flops"):
    if k in prep:
      row[k] = prep[k]
  if row.get("flops"):
    row["gflop_per_image"] = row["flops"] / prep["images"] / 1e9
    row["achieved_flops"] = row["flops"] / med
    peak = gpu_peak(row["device_kind"]) if row["platform"] == "gpu" else None
    if peak:
      col = "bf16" if dtype == "bfloat16" else "tf32"
      row["mfu"] = row["achieved_flops"] / peak[col]
      row["mfu_against"] = col
  dev_peaks = [s["device_peak"] for s in steps if s.get("device_peak")]
  if dev_peaks:
    row["device_peak_mib"] = max(dev_peaks) / 2**20
  return row


def markdown_rows(rows: list[dict], args, load: tuple[float, float],
                  date: Optional[str] = None) -> str:
  date = date or datetime.date.today().isoformat()
  size = args.img_size or (224 if args.width == "paper" else 64)
  out = []
  for r in rows:
    what = "train step (SAM+Adam)" if r["key"] == "train" else "inference"
    mem = (f"{r['device_peak_mib']:.0f} dev" if "device_peak_mib" in r else
           f"{r['rss_peak_mib']:.0f} RSS")
    if "xla_bytes" in r:
      mem += f" / {r['xla_bytes']['peak'] / 2**20:.0f} XLA"
    flops = f"{r['gflop_per_image']:.1f}" if "gflop_per_image" in r else (
        f"{r['torch_flops'] / r['images'] / 1e9:.1f}*" if r.get("torch_flops") else "")
    compile_s = f"{r['lower_s'] + r['compile_s']:.0f}" if "compile_s" in r else "-"
    mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else ""
    name = r["contender"] + (f" `{r['xla_flags']}`" if r["xla_flags"] else "")
    out.append(
        f"| {date} | {machine_line()}, load {load[0]:.1f}-{load[1]:.1f} | {name} | "
        f"{r['versions']} | {args.model} {args.width} {size}px {r.get('dtype', args.dtype)} | "
        f"{what} | {r['images']} | {r['ms_per_step']:.0f} | {r['images_per_s']:.2f} | "
        f"{r['cpu_s_per_step']:.1f} | {compile_s} | {mem} | {flops} | {mfu} |")
  return "\n".join(out)


MD_HEADER = ("| date | machine | contender | versions | model | what | images/step | "
             "ms/step (median) | images/s | CPU s/step | compile s | peak MiB | "
             "GFLOP/image | MFU |\n|" + "---|" * 14)


def print_table(rows: list[dict]) -> None:
  print(f"\n{'contender':<22} {'what':<9} {'img':>4} {'ms/step':>9} {'img/s':>8} {'cpu s':>7} "
        f"{'min-max ms':>15} {'RSS MiB':>8} {'compile':>8} {'GFLOP/step':>10} {'GFLOP/img':>9} "
        f"{'GFLOP/s':>8} {'loss@1':>9}")
  for r in rows:
    comp = f"{r['lower_s'] + r['compile_s']:.1f}" if "compile_s" in r else "-"
    if "gflop_per_image" in r:
      gf = (f"{r['flops'] / 1e9:>10.1f} {r['gflop_per_image']:>9.2f} "
            f"{r['achieved_flops'] / 1e9:>8.1f}")
    elif r.get("torch_flops"):  # FlopCounterMode: matmuls/convs only
      gf = (f"{r['torch_flops'] / 1e9:>9.1f}* {r['torch_flops'] / r['images'] / 1e9:>8.2f}* "
            f"{r['torch_flops'] / 1e9 / (r['ms_per_step'] / 1e3):>7.1f}*")
    else:
      gf = f"{'-':>10} {'-':>9} {'-':>8}"
    print(f"{r['contender']:<22} {r['key']:<9} {r['images']:>4} {r['ms_per_step']:>9.1f} "
          f"{r['images_per_s']:>8.2f} {r['cpu_s_per_step']:>7.2f} "
          f"{r['ms_min']:>7.0f}-{r['ms_max']:<7.0f} {r['rss_peak_mib']:>8.0f} {comp:>8} {gf} "
          f"{r['first_loss']:>9.5f}")
    if "mfu" in r:
      print(f"    {r['achieved_flops'] / 1e12:.2f} TFLOP/s, MFU {100 * r['mfu']:.1f}% "
            f"of {r['device_kind']} {r['mfu_against']} peak")
    if "xla_bytes" in r:
      xb = {k: f"{v / 2**20:.0f}" for k, v in r["xla_bytes"].items()}
      print(f"    XLA buffers MiB: {xb}")
  print("(GFLOP from XLA's cost analysis; * = torch FlopCounterMode, matmuls and convolutions "
        "only; loss@1 = first step's loss, or logits[0, 0] for inference)")


def report_main(args) -> None:
  """Re-prints the table and markdown rows of a saved --json result."""
  with open(args.report) as f:
    saved = json.load(f)
  run = argparse.Namespace(**saved["args"])
  print_table(saved["rows"])
  if args.markdown:
    print("\n" + MD_HEADER + "\n" + markdown_rows(saved["rows"], run, tuple(saved["load"]),
                                                   saved.get("date")))

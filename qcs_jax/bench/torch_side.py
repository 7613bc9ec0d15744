"""The PyTorch contender: qcs_jax.interop.reference (the authors' network) with SAM
and Adam written out."""
# Imports wait inside the functions that need them: a benchmark worker process imports
# only its own framework's side, whose memory and start-up it measures.
from __future__ import annotations

import platform
from typing import Any, Callable

from qcs_jax.bench.workload import make_batch, random_images, timed


class TorchBench:
  """qcs_jax/interop/reference.py: the authors' network; SAM + Adam written out."""

  framework = "torch"

  def __init__(self, args, cfg: dict, sd: dict):
    import torch  # pylint: disable=import-outside-toplevel
    from qcs_jax.interop import reference as R  # pylint: disable=import-outside-toplevel
    self.torch, self.R = torch, R
    self.args, self.cfg = args, cfg
    torch.set_num_threads(args.threads)
    self.dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    self.state_dict = {k: torch.from_numpy(v) for k, v in sd.items()}
    self.net = R.QCSReference(cfg).to(self.dev)
    self.fmt = (torch.channels_last if getattr(args, "channels_last", False)
                else torch.contiguous_format)
    self.net = self.net.to(memory_format=self.fmt)
    self.prepared: dict[str, Callable] = {}

  def versions(self) -> str:
    fmt = ", channels_last" if self.fmt is self.torch.channels_last else ""
    return f"torch {self.torch.__version__} ({self.torch.get_num_threads()} threads{fmt})"

  def _autocast(self):
    if self.args.dtype == "bfloat16":
      return self.torch.autocast(self.dev.type, dtype=self.torch.bfloat16)
    return _nullcontext()

  def _sync(self):
    if self.dev.type == "cuda":
      self.torch.cuda.synchronize()

  def prepare(self, key: str) -> dict:
    torch, R, F = self.torch, self.R, self.torch.nn.functional
    self.net.load_state_dict(self.state_dict)  # every program starts from the same weights
    if key == "train":
      images, labels = make_batch(self.cfg, self.args.batch, self.args.seed)
      nb = images.shape[1]
      branches = [R.to_nchw(images[:, i]).to(self.dev, memory_format=self.fmt)
                  for i in range(nb)]
      y = torch.from_numpy(labels).long().to(self.dev)
      net = self.net.train()
      params = [p for p in net.parameters() if p.requires_grad]
      optim_cfg = dict(lr=4e-6, betas=(0.9, 0.999), eps=1e-8)
      opt = torch.optim.Adam(params, **optim_cfg)
      rho = 0.05

      def loss_fn():
        with self._autocast():
          out = net.forward_train(*branches)
        terms = [F.cross_entropy(out[k][b].float(), y[:, b])
                 for k in ("base", "cross") for b in range(nb)]
        return torch.stack(terms).mean()

      def run():
        loss = loss_fn()
        loss.backward()
        with torch.no_grad():
          used = [p for p in params if p.grad is not None]
          norm = torch.sqrt(sum(torch.sum(p.grad * p.grad) for p in used))
          perturb = []
          for p in used:
            e = rho * p.grad / (norm + 1e-12)
            p.add_(e)
            perturb.append((p, e))
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        with torch.no_grad():
          for p, e in perturb:
            p.sub_(e)
        opt.step()
        opt.zero_grad(set_to_none=True)
        self._sync()
        return float(loss.detach())

      n_images = images.shape[0] * nb
    else:
      b = int(key.split(":")[1])
      x = R.to_nchw(random_images(self.cfg, b, seed=self.args.seed)).to(
          self.dev, memory_format=self.fmt)
      net = self.net.eval()

      def run():
        with torch.inference_mode(), self._autocast():
          out = net.infer(x)
        self._sync()
        return float(out[0, 0])

      n_images = b
    self.prepared[key] = run
    info: dict[str, Any] = dict(images=n_images)
    if self.args.torch_flops:
      from torch.utils import flop_counter  # pylint: disable=import-outside-toplevel
      counter = flop_counter.FlopCounterMode(display=False)
      with counter:
        run()
      info["torch_flops"] = float(counter.get_total_flops())
    return info

  def step(self, key: str) -> dict:
    return timed(self.prepared[key])

  def device_info(self) -> dict:
    return dict(platform=self.dev.type, device_kind=platform.processor() or "cpu")


class _nullcontext:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False

"""PyTorch interop: the .pth reader, the weight converter, the PyTorch reference network
and the parity check (torch is needed only by the reference and verify)."""

"""Placeholder for torchvision.ops.misc (see ../__init__.py)."""
import torch.nn as nn


class FrozenBatchNorm2d(nn.Module):
    def __init__(self, *args, **kwargs):
        raise RuntimeError("FrozenBatchNorm2d is a test stand-in: torchvision is not installed.")

"""Placeholders for the torchvision.transforms names open_clip imports (see ../__init__.py)."""


class _Unavailable:
    def __init__(self, *args, **kwargs):
        raise RuntimeError(f"{type(self).__name__} is a test stand-in: torchvision is not installed.")


class InterpolationMode:
    NEAREST, BILINEAR, BICUBIC = "nearest", "bilinear", "bicubic"


Normalize = Compose = RandomResizedCrop = ToTensor = Resize = CenterCrop = ColorJitter = Grayscale = _Unavailable

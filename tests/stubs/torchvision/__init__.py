"""Test-only stand-in for torchvision, which has no CPU build on the project's machines.

open_clip imports a few torchvision names at import time (image transforms, FrozenBatchNorm2d)
but never uses them to build or run a ViT/text tower. These placeholders let `import open_clip`
succeed; calling one of them fails loudly. conftest.py puts this folder on sys.path only when
the real torchvision is absent.
"""

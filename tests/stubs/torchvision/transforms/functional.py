"""Placeholder for torchvision.transforms.functional (see ../../__init__.py)."""

"""Lowest layer: tensors in, images out. Imports nothing else from the project."""

"""Attend, Infer, Repeat as software: models, objectives, training, checkpoints, CLI and figures.

import inverse_graphics as ig
model = ig.load_pretrained("air-multi-mnist")
out = model.infer(images)   # images: FloatTensor (B, 50, 50) in [0, 1]

tabletop = ig.load_pretrained("air-tabletop")   # or "supervised-tabletop"
scenes = tabletop.infer(renders).scenes          # renders: FloatTensor (B, 3, 64, 64) in [0, 1]
"""

from inverse_graphics.air import AIR, AIRConfig, InferenceResult
from inverse_graphics.pretrained import load, load_pretrained

__all__ = ["AIR", "AIRConfig", "InferenceResult", "load", "load_pretrained"]

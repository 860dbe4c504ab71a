"""The small networks of the 3D methods, together (as modules.py for the 2D ones).

Letters as in docs/conventions.md, plus S = number of shapes in the library (scenes.tabletop_objects.SHAPES) and
K = number of output slots of the supervised regressor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ConvEncoder", "SlotOutput", "SlotHead"]


class ConvEncoder(nn.Module):
    """RGB render -> embedding: stride-2 convolutions on the image plus two coordinate channels, then one linear
    layer. The coordinate channels (CoordConv, Liu et al. 2018) let the network read *where* an edge is, which
    position regression needs and plain convolutions, being translation equivariant, make hard to learn."""

    coords: torch.Tensor  # FloatTensor (1, 2, H, W): x and y of each pixel, -1..1

    def __init__(self, image_size: int, channels: tuple[int, ...], embed_dim: int):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3 + 2
        for c_out in channels:
            layers += [nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1), nn.ReLU()]
            c_in = c_out
        self.conv = nn.Sequential(*layers)
        side = image_size
        for _ in channels:
            side = (side + 1) // 2
        self.fc = nn.Linear(c_in * side * side, embed_dim)
        ramp = torch.linspace(-1.0, 1.0, image_size)
        self.register_buffer("coords", torch.stack(torch.meshgrid(ramp, ramp, indexing="xy"))[None], persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images FloatTensor (B, 3, H, W) in [0, 1] -> FloatTensor (B, embed_dim)."""
        B = images.shape[0]
        x = torch.cat([images, self.coords.expand(B, -1, -1, -1)], dim=1)  # (B, 5, H, W)
        return F.relu(self.fc(self.conv(x).flatten(1)))


@dataclass(frozen=True)
class SlotOutput:
    """The regressor's raw per-slot predictions."""

    presence_logits: torch.Tensor  # FloatTensor (B, K): logit of "this slot holds an object"
    shape_logits: torch.Tensor  # FloatTensor (B, K, S): identity logits over the shape library
    positions: torch.Tensor  # FloatTensor (B, K, 2): (x, y) on the table, metres
    yaw_vectors: torch.Tensor  # FloatTensor (B, K, S, 2): per shape, an unnormalised (cos, sin) of its yaw code


class SlotHead(nn.Module):
    """Embedding -> K slots of (presence, identity, position, one yaw vector per shape)."""

    def __init__(self, embed_dim: int, slots: int, n_shapes: int, position_scale: float):
        super().__init__()
        self.slots, self.n_shapes, self.position_scale = slots, n_shapes, position_scale
        self.fc = nn.Linear(embed_dim, slots * (1 + n_shapes + 2 + 2 * n_shapes))

    def forward(self, embedding: torch.Tensor) -> SlotOutput:
        """embedding FloatTensor (B, embed_dim) -> SlotOutput."""
        B, K, S = embedding.shape[0], self.slots, self.n_shapes
        out = self.fc(embedding).view(B, K, -1)  # (B, K, 1 + S + 2 + 2S)
        presence, shapes, xy, yaw = out.split([1, S, 2, 2 * S], dim=-1)
        return SlotOutput(
            presence_logits=presence.squeeze(-1),
            shape_logits=shapes,
            positions=xy * self.position_scale,  # unit outputs span the table
            yaw_vectors=yaw.reshape(B, K, S, 2),
        )

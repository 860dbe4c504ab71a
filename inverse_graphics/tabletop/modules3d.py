"""The small networks of the 3D methods, together (as modules.py for the 2D ones).

Letters as in docs/conventions.md, plus S = number of objects in the model's World (len(world.objects)) and
K = number of output slots of the supervised regressor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from inverse_graphics.modules import GatedRecurrence

__all__ = [
    "ConvEncoder",
    "SlotOutput",
    "SlotHead",
    "WhereDists",
    "ObjectDists",
    "WhereHead3D",
    "GlimpseEncoder",
    "ObjectHead3D",
    "Baseline3D",
]


class ConvEncoder(nn.Module):
    """RGB render -> embedding: stride-2 convolutions on the image plus two coordinate channels, then one linear
    layer. The coordinate channels (CoordConv, Liu et al. 2018) let the network read *where* an edge is, which
    position regression needs and plain convolutions, being translation equivariant, make hard to learn."""

    coords: torch.Tensor  # FloatTensor (1, 2, h, w): x and y of each (pooled) pixel, -1..1 across width and height

    def __init__(self, image_size: int | tuple[int, int], channels: tuple[int, ...], embed_dim: int, pool: int = 1):
        """image_size: an int (H = W) or (W, H); pool: average-pool the image by this factor first (a cheaper
        encoder for large images, whose fine detail the caller sees elsewhere, e.g. in a glimpse)."""
        super().__init__()
        self.pool = int(pool)
        if self.pool < 1:
            raise ValueError(f"pool must be >= 1, got {pool}")
        layers: list[nn.Module] = []
        c_in = 3 + 2
        for c_out in channels:
            layers += [nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1), nn.ReLU()]
            c_in = c_out
        self.conv = nn.Sequential(*layers)
        W, H = (image_size, image_size) if isinstance(image_size, int) else image_size
        W, H = -(-W // self.pool), -(-H // self.pool)  # the pooled size (ceil_mode)
        w, h = W, H
        for _ in channels:
            w, h = (w + 1) // 2, (h + 1) // 2
        self.fc = nn.Linear(c_in * h * w, embed_dim)
        ramp_x, ramp_y = torch.linspace(-1.0, 1.0, W), torch.linspace(-1.0, 1.0, H)
        coords = torch.stack(torch.meshgrid(ramp_x, ramp_y, indexing="xy"))[None]  # (1, 2, H, W)
        self.register_buffer("coords", coords, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images FloatTensor (B, 3, H, W) in [0, 1] -> FloatTensor (B, embed_dim)."""
        B = images.shape[0]
        if self.pool > 1:
            images = F.avg_pool2d(images, self.pool, ceil_mode=True)
        x = torch.cat([images, self.coords.expand(B, -1, -1, -1)], dim=1)  # (B, 5, h, w)
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

    position_scale: torch.Tensor  # FloatTensor (2,): metres per unit output along x and y (the table's half sides)

    def __init__(self, embed_dim: int, slots: int, n_shapes: int, position_scale: float | tuple[float, float]):
        super().__init__()
        self.slots, self.n_shapes = slots, n_shapes
        scale = (position_scale, position_scale) if isinstance(position_scale, float | int) else position_scale
        self.register_buffer("position_scale", torch.tensor([float(v) for v in scale]), persistent=False)
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


@dataclass(frozen=True)
class WhereDists:
    """3D AIR's first look at one step (tabletop/air3d.py defines the latents): is there another object,
    and roughly where (the glimpse is taken there; `ObjectDists` refines the position from the glimpse)."""

    pres_logit: torch.Tensor  # FloatTensor (B,): logit of q(z_pres = 1)
    u_coarse: torch.Tensor  # FloatTensor (B, 2): the position latent u of the glimpse's centre


@dataclass(frozen=True)
class ObjectDists:
    """3D AIR's q for one step's object, given the glimpse at `WhereDists.u_coarse`."""

    u_loc: torch.Tensor  # FloatTensor (B, 2): mean of the Gaussian over the position latent u
    u_scale: torch.Tensor  # FloatTensor (B, 2): its standard deviation, > 0
    shape_logits: torch.Tensor  # FloatTensor (B, S): q(identity), unnormalised
    v_loc: torch.Tensor  # FloatTensor (B, S, 2): per shape, mean of the Gaussian over the yaw latent v
    v_scale: torch.Tensor  # FloatTensor (B, S, 2): per shape, its standard deviation, > 0


class WhereHead3D(nn.Module):
    """LSTM state -> WhereDists."""

    def __init__(self, hidden: int):
        super().__init__()
        self.fc = nn.Linear(hidden, 1 + 2)
        with torch.no_grad():  # start at the table's centre
            self.fc.weight.mul_(0.1)
            self.fc.bias.zero_()

    def forward(self, h: torch.Tensor) -> WhereDists:
        """h FloatTensor (B, hidden) -> WhereDists."""
        pres, u = self.fc(h).split([1, 2], dim=1)
        return WhereDists(pres_logit=pres.squeeze(1), u_coarse=u)


class GlimpseEncoder(nn.Module):
    """A G x G glimpse (the image around one object) -> a feature vector: a first convolution of stride
    `first_stride` (1: the few pixels that tell a cube from a cylinder are seen at full resolution; 2 for a glimpse
    of twice as many samples, which its 3 x 3 kernels still see every one of), then stride-2 convolutions."""

    def __init__(self, glimpse_size: int, channels: tuple[int, ...], out_dim: int, first_stride: int = 1):
        super().__init__()
        layers: list[nn.Module] = []
        c_in, side = 3, glimpse_size
        for i, c_out in enumerate(channels):
            stride = first_stride if i == 0 else 2
            layers += [nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1), nn.ReLU()]
            c_in, side = c_out, (side - 1) // stride + 1  # kernel 3, padding 1
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in * side * side, out_dim)

    def forward(self, glimpses: torch.Tensor) -> torch.Tensor:
        """glimpses FloatTensor (B, 3, G, G) -> FloatTensor (B, out_dim)."""
        return F.relu(self.fc(self.conv(glimpses).flatten(1)))


class ObjectHead3D(nn.Module):
    """(LSTM state, glimpse features, the glimpse's centre u_coarse) -> ObjectDists: the position as a correction
    of the glimpse's centre (a centred crop tells an offset far better than the whole image tells a position),
    the identity and, per shape, the yaw latent. q(v) is per shape (read off for the chosen one) because v's
    meaning depends on the shape: yaw = atan2(v) / m(shape), m = the shape's yaw symmetry order."""

    def __init__(self, hidden: int, glimpse_dim: int, n_shapes: int):
        super().__init__()
        self.n_shapes = n_shapes
        self.mlp = nn.Sequential(nn.Linear(hidden + glimpse_dim, hidden), nn.ReLU())
        self.fc = nn.Linear(hidden, 4 + n_shapes + 4 * n_shapes)
        with torch.no_grad():
            self.fc.weight.mul_(0.1)
            self.fc.bias.zero_()
            self.fc.bias[2:4].fill_(-1.5)  # softplus(-1.5) = 0.2: u sd, about 2.5 cm at the centre
            v = self.fc.bias[4 + n_shapes :].view(n_shapes, 4)
            v[:, 0].fill_(1.0)  # v loc (1, 0): yaw 0, away from v = 0 where atan2 is singular
            v[:, 2:].fill_(-1.5)  # v sd 0.2

    def forward(self, h: torch.Tensor, glimpse_features: torch.Tensor, u_coarse: torch.Tensor) -> ObjectDists:
        """h FloatTensor (B, hidden), glimpse_features FloatTensor (B, glimpse_dim), u_coarse (B, 2)."""
        B, S = h.shape[0], self.n_shapes
        out = self.fc(self.mlp(torch.cat([h, glimpse_features], dim=1)))
        u, shapes, v = out.split([4, S, 4 * S], dim=1)
        v = v.view(B, S, 4)
        return ObjectDists(
            u_loc=u_coarse + u[:, :2],
            u_scale=F.softplus(u[:, 2:]) + 1e-4,
            shape_logits=shapes,
            v_loc=v[..., :2],
            v_scale=F.softplus(v[..., 2:]) + 1e-4,
        )


class Baseline3D(nn.Module):
    """NVIL baseline of 3D AIR: predicts each step's learning signal from the image and the previous latents
    (its own small CNN, as the 2D `modules.Baseline` has its own encoder). Inputs are detached by the caller."""

    def __init__(
        self, image_size: int | tuple[int, int], channels: tuple[int, ...], step_dim: int, hidden: int, pool: int = 1
    ):
        super().__init__()
        self.encoder = ConvEncoder(image_size, channels, hidden, pool)
        self.norm = nn.LayerNorm(hidden)  # keeps the LSTM's gates unsaturated, as AIR3D's embed_norm
        self.rnn = GatedRecurrence(hidden, step_dim, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, images: torch.Tensor, step_inputs: torch.Tensor) -> torch.Tensor:
        """images FloatTensor (B, 3, H, W), step_inputs FloatTensor (B, T, step_dim) -> baselines (B, T)."""
        gates = self.rnn.image_gates(self.norm(self.encoder(images)))  # (B, 4 hidden), once per image
        zeros = images.new_zeros(images.shape[0], self.rnn.hidden)
        state, outs = (zeros, zeros), []
        for t in range(step_inputs.shape[1]):
            state = self.rnn(gates, step_inputs[:, t], state)
            outs.append(self.out(state[0]).squeeze(1))
        return torch.stack(outs, dim=1)

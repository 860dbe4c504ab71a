"""The small networks of AIR, together (as Pyro's examples/air/modules.py).

All take and return float tensors; shapes use the letters of docs/conventions.md.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ImageEncoder(nn.Module):
    """Flattened canvas -> embedding, run once per image (not once per step, as in Pyro's guide, which feeds the
    raw 2500 pixels to the LSTM at every step: most of its cost)."""

    def __init__(self, n_pixels: int, embed_dim: int):
        super().__init__()
        self.fc = nn.Linear(n_pixels, embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, H, W) -> (B, embed_dim)."""
        return F.relu(self.fc(images.flatten(1)))


class GatedRecurrence(nn.Module):
    """An LSTM cell whose input is split into a per-image part (same at every step) and a per-step part.

    The image part's contribution to the four gates is computed once per image by `image_gates`; each step adds
    only the (small) previous latents and the hidden state. Mathematically an ordinary LSTM cell on
    [image_embedding, step_input].
    """

    def __init__(self, image_dim: int, step_dim: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.image_proj = nn.Linear(image_dim, 4 * hidden)
        self.step_proj = nn.Linear(step_dim + hidden, 4 * hidden, bias=False)

    def image_gates(self, embedding: torch.Tensor) -> torch.Tensor:
        """(B, image_dim) -> (B, 4 * hidden)."""
        return self.image_proj(embedding)

    def forward(
        self, image_gates: torch.Tensor, step_input: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step: image_gates (B, 4 hidden), step_input (B, step_dim), state (h, c) each (B, hidden)."""
        h, c = state
        gates = image_gates + self.step_proj(torch.cat([step_input, h], dim=1))
        return lstm_update(gates, c, self.hidden)


def lstm_update(gates: torch.Tensor, c: torch.Tensor, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The LSTM's state update from pre-activations (B, 4 hidden) ordered (input, forget, output, cell), so that the
    three sigmoid gates are one contiguous slice. Returns (h, c), each (B, hidden)."""
    ifo = torch.sigmoid(gates[:, : 3 * hidden])
    g = torch.tanh(gates[:, 3 * hidden :])
    c = ifo[:, hidden : 2 * hidden] * c + ifo[:, :hidden] * g
    h = ifo[:, 2 * hidden :] * torch.tanh(c)
    return h, c


class WhereHead(nn.Module):
    """Hidden state -> z_pres logit and the Gaussian over the z_where latent (log s, x, y)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.fc = nn.Linear(hidden, 7)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h (B, hidden) -> pres_logit (B,), where_loc (B, 3), where_scale (B, 3)."""
        out = self.fc(h)
        return out[:, 0], out[:, 1:4], F.softplus(out[:, 4:7]) + 1e-4


class WhatEncoder(nn.Module):
    """Attention window -> Gaussian over z_what."""

    def __init__(self, window_pixels: int, hidden: int, z_what_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(window_pixels, hidden)
        self.fc2 = nn.Linear(hidden, 2 * z_what_dim)

    def forward(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """windows (B, h, w) -> loc (B, D), scale (B, D)."""
        loc, scale = self.fc2(F.relu(self.fc1(windows.flatten(1)))).chunk(2, dim=1)
        return loc, F.softplus(scale) + 1e-4


class GlyphDecoder(nn.Module):
    """z_what -> glyph window in [0, 1]. The output bias starts at -2 so that a fresh decoder draws almost
    nothing (sigmoid(-2) = 0.12): grey squares at the start push the count towards 0 (a known AIR pitfall)."""

    def __init__(self, z_what_dim: int, hidden: int, window_size: int, output_bias: float = -2.0):
        super().__init__()
        self.window_size = window_size
        self.fc1 = nn.Linear(z_what_dim, hidden)
        self.fc2 = nn.Linear(hidden, window_size * window_size)
        nn.init.constant_(self.fc2.bias, output_bias)

    def forward(self, z_what: torch.Tensor) -> torch.Tensor:
        """z_what (N, D) -> windows (N, h, w)."""
        out = torch.sigmoid(self.fc2(F.relu(self.fc1(z_what))))
        return out.view(-1, self.window_size, self.window_size)


class Baseline(nn.Module):
    """NVIL baseline: predicts each step's REINFORCE learning signal from the image and the previous latents.

    Its inputs are detached by the caller: the baseline must not shape the inference network's features.
    """

    def __init__(self, n_pixels: int, step_dim: int, hidden: int):
        super().__init__()
        self.encoder = ImageEncoder(n_pixels, hidden)
        self.rnn = GatedRecurrence(hidden, step_dim, hidden)
        self.out = nn.Linear(hidden, 1)

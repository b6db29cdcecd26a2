"""A custom feature net registered from outside the package, as a user's `model.plugins` module would do: the Ray
test trains with it, so every Ray worker must import this module before it builds the model."""
from __future__ import annotations

from torch import Tensor, nn

from ats_model.nets import l2_normalise, register_feature



class TinyPatchNet(nn.Module):
    """One conv and a linear map; L2-normalised rows as every feature net."""

    def __init__(self, in_channels: int, out_dim: int = 8) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.conv = nn.Conv2d(in_channels, 4, 3, stride=2)
        self.head = nn.Linear(4, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x).relu().mean((2, 3))  # (M, C, P, P) -> (M, 4)
        return l2_normalise(self.head(h))  # (M, out_dim)


@register_feature("plugin_tiny")
def plugin_tiny(in_channels: int, out_dim: int = 8) -> nn.Module:
    return TinyPatchNet(in_channels, out_dim)

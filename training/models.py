"""The trainable modules of the training job, by model name, and their forward in each phase.

`StreamingATS` is ATSModel's sampled training forward with the patch reads overlapped by feature computation: it
samples all B images (`ATSModel.plan`), fires every patch server's request at once, runs the feature net on
whichever micro-batch arrives first, and pools with `ATSModel.head`. Why not prefetch the next batch's patches:
they would be sampled from the attention before this step's update and weighed with the attention after it,
which biases the estimator (see train_loop.py).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ats_model.ats import ATSConfig, ATSModel, ATSOutput
from ats_model.baselines import CNNBaseline, DeepMIL
from ats_model.memory_reader import to_unit_float
from ats_model.nets import create_attention, create_feature
from training import config as C
from training.data import Batch, DirectFetcher, ServerFetcher, patch_reader_fn


class StreamingATS(nn.Module):
    """ATSModel's sampled training forward with the patch reads overlapped by feature computation (see above).

    The same `plan` and `head` as `ATSModel.forward`; only the reading and feature computation in between are
    streamed. Evaluation uses `self.ats` itself with a blocking reader."""

    def __init__(self, ats: ATSModel) -> None:
        super().__init__()
        self.ats = ats

    def forward(self, batch: Batch, fetcher: DirectFetcher | ServerFetcher, generator: torch.Generator | None = None
                ) -> ATSOutput:
        m = self.ats
        plan = m.plan(batch.low, batch.level0_hw, batch.low_hw, mode="sampled", generator=generator)
        pending = fetcher.submit(batch.image_ids, plan.boxes.cpu().numpy())  # every server's request at once
        positions, parts = [], []
        while pending:
            ready, pending = fetcher.wait_any(pending)
            for p in ready:  # features of whichever micro-batch arrived first
                pixels = torch.from_numpy(to_unit_float(fetcher.result(p))).to(batch.low.device)  # (b, N, C, P, P)
                parts.append(m.features(pixels))  # (b, N, D)
                positions += p.positions
        order = torch.argsort(torch.tensor(positions))
        features = torch.cat(parts)[order]  # (B, N, D) in batch order
        return m.head(plan, features)


class MILModel(nn.Module):
    """Deep MIL over every grid patch, reading through the same fetchers (blocking reads, chunked by DeepMIL)."""

    def __init__(self, mil: DeepMIL) -> None:
        super().__init__()
        self.mil = mil

    def forward(self, batch: Batch, fetcher: DirectFetcher | ServerFetcher):
        return self.mil(batch.image_ids, batch.level0_hw, patch_reader_fn(fetcher))


def build_model(cfg: C.ModelConfig, in_channels: int, n_classes: int) -> nn.Module:
    """The trainable module for `cfg.name`: StreamingATS (ats, uniform), MILModel (deepmil) or CNNBaseline (cnn)."""
    patch = (cfg.patch_size, cfg.patch_size)
    if cfg.name in ("ats", "uniform"):
        attention = create_attention("uniform" if cfg.name == "uniform" else cfg.attention_net, in_channels)
        feature = create_feature(cfg.feature_net, in_channels, **_feature_kw(cfg))
        ats_cfg = ATSConfig(n_patches=cfg.n_patches, patch_hw=patch, replace=cfg.replace, estimator=cfg.estimator,
                            baseline=cfg.baseline, smoothing=cfg.smoothing, entropy_lambda=cfg.entropy_lambda)
        return StreamingATS(ATSModel(attention, feature, n_classes, ats_cfg))
    if cfg.name == "deepmil":
        stride = cfg.mil_stride or cfg.patch_size
        feature = create_feature(cfg.feature_net, in_channels, **_feature_kw(cfg))
        return MILModel(DeepMIL(feature, n_classes, patch, (stride, stride), hidden=cfg.mil_hidden))
    return CNNBaseline(in_channels, n_classes, width=cfg.cnn_width, stages=cfg.cnn_stages)


def _feature_kw(cfg: C.ModelConfig) -> dict[str, Any]:
    return {} if cfg.feature_net == "resnet_small" else {"out_dim": cfg.feature_dim}


def core(model: nn.Module) -> nn.Module:
    """The model without DDP and training wrappers: ATSModel, DeepMIL or CNNBaseline (what is saved and logged)."""
    model = getattr(model, "module", model)
    return getattr(model, "ats", None) or getattr(model, "mil", None) or model


def train_forward(model: nn.Module, batch: Batch, fetcher, weights: Tensor | None, generator) -> tuple[Tensor, Tensor]:
    """(loss, logits) of one training batch for any model kind."""
    inner = getattr(model, "module", model)
    if isinstance(inner, StreamingATS):
        out = model(batch, fetcher, generator)
        return inner.ats.loss(out, batch.labels, weights), out.logits
    logits = model(batch, fetcher).logits if isinstance(inner, MILModel) else model(batch.low)
    return F.cross_entropy(logits, batch.labels, weight=weights), logits


@torch.no_grad()
def eval_logits(model: nn.Module, batch: Batch, fetcher, mode: str, generator=None) -> Tensor:
    """Logits in evaluation `mode` (sampled / topk / exact for ATS; deterministic for the baselines)."""
    net = core(model)
    if isinstance(net, ATSModel):
        return net(batch.low, patch_reader_fn(fetcher), batch.image_ids, batch.level0_hw, batch.low_hw,
                   mode=mode, generator=generator).logits
    if isinstance(net, DeepMIL):
        return net(batch.image_ids, batch.level0_hw, patch_reader_fn(fetcher)).logits
    return net(batch.low)


@torch.no_grad()
def attention_maps(model: nn.Module, batch: Batch, fetcher) -> list[np.ndarray] | None:
    """Per image, the attention over its low-res view (ATS) or over its patch grid (Deep MIL); None for the CNN."""
    net = core(model)
    if isinstance(net, ATSModel):
        logits_map = net.attention_logits(batch.low, batch.low_hw)  # (B, Ha, Wa)
        att = torch.softmax(logits_map.flatten(1), 1).reshape(logits_map.shape)  # (B, K) -> (B, Ha, Wa)
        return list(att.cpu().numpy())
    if isinstance(net, DeepMIL):
        out = net(batch.image_ids, batch.level0_hw, patch_reader_fn(fetcher))
        return [a[: int(g[0]), : int(g[1])].cpu().numpy() for a, g in zip(out.attention, out.grid_hw)]
    return None

"""On a GPU: the ATS forward agrees with the CPU's, bf16 autocast trains, patches reach the device through pinned
memory, and the loop logs its CUDA memory. Skipped without CUDA; benchmarks/gpu_suite.sh runs these first."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from training import config as C
from training.data import DirectFetcher, LowResViews, load_split, to_device
from training.loop import train_loop
from training.models import autocast, build_model
from training.session import LocalSession
from tests.training.test_loop import TINY_MODEL, tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")


def _batch(tiny_data):
    from pipeline.reader import PatchReader

    reader = PatchReader(tiny_data)
    examples, classes = load_split(tiny_data, "train", 4)
    return LowResViews(reader, 0.25).batch(examples), DirectFetcher(reader), len(classes)


def test_to_device_copies_through_pinned_memory():
    x = torch.arange(12.0).reshape(3, 4)
    y = to_device(x, CUDA)
    torch.cuda.synchronize()
    assert y.device.type == "cuda" and torch.equal(y.cpu(), x)


def test_topk_logits_on_the_gpu_match_the_cpu(tiny_data):
    batch, fetcher, n_classes = _batch(tiny_data)
    torch.manual_seed(0)
    model = build_model(C.from_dict({"model": TINY_MODEL}).model, 1, n_classes).eval()
    cpu = model.logits(batch, fetcher, "topk")
    gpu = model.to(CUDA).logits(batch.to(CUDA), fetcher, "topk")
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)


def test_a_bf16_training_step_on_the_gpu_is_finite_and_close_to_fp32(tiny_data):
    batch, fetcher, n_classes = _batch(tiny_data)
    torch.manual_seed(0)
    model = build_model(C.from_dict({"model": TINY_MODEL}).model, 1, n_classes).to(CUDA)
    gpu_batch = batch.to(CUDA)
    losses = {}
    for precision in ("fp32", "bf16"):
        with autocast(CUDA, precision):
            loss, logits = model(gpu_batch, fetcher, None, torch.Generator(device=CUDA).manual_seed(1))
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        model.zero_grad(set_to_none=True)
        losses[precision] = float(loss)
    # the same draw (same seed): bf16's 8-bit mantissa moves the loss by well under 1%
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02)


def test_the_loop_trains_on_the_gpu_in_bf16_and_reports_cuda_memory(tiny_data, tmp_path, local_tracking):
    cfg = tiny_config(tiny_data, runtime={"precision": "bf16", "tracking_uri": local_tracking})
    session = LocalSession(tmp_path, device="cuda")
    train_loop({"config": cfg.to_dict(), "run_id": ""}, session)
    assert np.isfinite(session.reports[0]["train_loss"])
    assert torch.cuda.max_memory_allocated() > 0

"""attention_on_objects: the attention mass on an image's own-class digits, from the boxes the generator recorded."""
from __future__ import annotations

import numpy as np
import pytest

from training import config as C
from training.data import load_split
from training.loop import train_loop
from training.objects import mass_on_boxes
from training.session import LocalSession
from tests.training.test_loop import tiny_config


def test_mass_on_boxes_counts_the_cells_whose_centre_is_inside():
    attention = np.arange(12, dtype=np.float64).reshape(3, 4) / 66  # sums to 1
    # centres at y = 2 + 4 r (2, 6, 10), x = 2 + 4 c (2, 6, 10, 14); the box [4, 11) x [5, 7) holds rows 1-2, col 1
    assert mass_on_boxes(attention, (2, 2), (4, 4), np.array([[4, 5, 7, 2]])) == pytest.approx((5 + 9) / 66)
    # half-open: a centre on the far edge is outside; two overlapping boxes count a cell once
    assert mass_on_boxes(attention, (2, 2), (4, 4), np.array([[0, 0, 2, 2]])) == 0
    assert mass_on_boxes(attention, (2, 2), (4, 4), np.array([[0, 0, 3, 3], [1, 1, 2, 2]])) == pytest.approx(0)
    assert mass_on_boxes(attention, (2, 2), (4, 4), np.array([[0, 0, 3, 3], [0, 0, 7, 3]])) == pytest.approx(4 / 66)


def test_uniform_attention_scores_the_own_class_boxes_share_of_the_cells(tiny_data, tmp_path):
    """U-N's attention is flat over the valid cells, so its metric is the share of cells whose level-0 centre lies
    in a digit of the label class, counted here from the generator itself (not the stored boxes)."""
    from pipeline import megapixel_mnist as mm

    cfg = tiny_config(tiny_data, model={"name": "uniform"}, data={"max_train": 4})
    session = LocalSession(tmp_path)
    train_loop({"config": cfg.to_dict(), "run_id": ""}, session)
    reported = session.reports[0]["attention_on_objects"]

    bank = mm.load_bank("test")
    examples, _ = load_split(tiny_data, "test", 4)
    centres = (np.arange(48) + 0.5) * 4  # the 48 px view (level 2 of 192 px): cell centres on level 0
    shares = []
    for example in examples:
        sample = mm.make_image(bank, "test", int(example.image_id.rsplit("-", 1)[1]),
                               mm.MegapixelMNISTConfig(size=192, n_digits=3, n_noise=4))
        inside = np.zeros((48, 48), bool)
        for b in sample.digits:
            if str(b.digit) == sample.label:
                inside |= ((centres >= b.y0) & (centres < b.y0 + 28))[:, None] & \
                          ((centres >= b.x0) & (centres < b.x0 + 28))[None, :]
        shares.append(inside.mean())
    assert 0 < reported == pytest.approx(np.mean(shares), rel=1e-6)
    assert session.reports[0]["elapsed_train_s"] > 0


def test_the_cnn_logs_no_attention_metric(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, model={"name": "cnn"}, data={"max_train": 4}, runtime={"eval_mode": "exact"})
    session = LocalSession(tmp_path)
    train_loop({"config": cfg.to_dict(), "run_id": ""}, session)
    assert "attention_on_objects" not in session.reports[0]


def test_clip_grad_norm_is_validated():
    with pytest.raises(C.ConfigError, match="clip_grad_norm"):
        C.from_dict({"optim": {"clip_grad_norm": -1}})

"""jobs/predict.py end to end on the tiny known-answer scene of tests/training/test_predict.py: exit codes, files,
plain progress lines (no carriage returns) when the output is not a terminal."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs import predict
from tests.training.test_predict import Scene, make_scene


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Scene:
    return make_scene(tmp_path_factory.mktemp("scene"))


def test_predict_a_split_writes_every_output(scene: Scene, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    rc = predict.main(["--model", scene.ckpt, "--data", scene.root, "--split", "all", "--out", str(out),
                       "--mode", "sampled", "--top-k", "2", "--mass", "0.5"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "\r" not in captured.out + captured.err
    assert "predict: 2/2 images (0 failed)" in captured.err and "2/2 images predicted (sampled)" in captured.out
    assert sorted(pq.read_table(out / "predictions.parquet").column("image_id").to_pylist()) == ["bright", "dark"]
    for image_id in ("bright", "dark"):
        features = json.loads((out / "geojson" / f"{image_id}.geojson").read_text())["features"]
        assert [f["properties"].get("rank") for f in features] == [1, 2, None]  # 2 boxes, one contour
        assert (out / "heatmaps" / f"{image_id}.png").is_file() and (out / "heatmaps" / f"{image_id}.zarr").is_dir()
    # the same folder again: refused without --force, then written over with it
    assert predict.main(["--model", scene.ckpt, "--data", scene.root, "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert predict.main(["--model", scene.ckpt, "--data", scene.root, "--out", str(out), "--force",
                         "--no-progress"]) == 0
    assert pq.read_table(out / "predictions.parquet").column("image_id").to_pylist() == ["bright"]


def test_images_with_a_failure_exit_1_and_name_it(scene: Scene, tmp_path: Path, capsys: pytest.CaptureFixture
                                                  ) -> None:
    rc = predict.main(["--model", scene.ckpt, "--images", scene.npy, str(tmp_path / "nope.npy"),
                       "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert rc == 1 and "\r" not in captured.out + captured.err
    assert "1 failed:" in captured.out and "nope" in captured.out and "not ingested" in captured.out
    assert "ingest: 2/2 images (1 failed)" in captured.err


def test_bad_model_exits_2_and_writes_nothing(scene: Scene, tmp_path: Path, capsys: pytest.CaptureFixture,
                                             local_tracking: str) -> None:
    out = tmp_path / "out"
    assert predict.main(["--model", str(tmp_path), "--data", scene.root, "--out", str(out)]) == 2
    assert "not a complete checkpoint" in capsys.readouterr().err
    assert predict.main(["--model", "no-such-run", "--data", scene.root, "--out", str(out),
                         "--tracking-uri", local_tracking]) == 2
    assert "neither a checkpoint folder nor a run" in capsys.readouterr().err
    assert not out.exists()

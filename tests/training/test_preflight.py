"""training.preflight: bad data or configs fail before Ray starts or an MLflow run exists, one line naming the fix,
and `jobs/train.py` exits 2 on them."""
from __future__ import annotations

import pytest

from pipeline.manifest import ManifestRow, write_manifest
from tests.training.test_loop import tiny_config
from training import checkpoint
from training import config as C
from training.preflight import preflight


def test_a_good_config_passes(tiny_data):
    preflight(tiny_config(tiny_data))
    preflight(tiny_config(tiny_data, model={"name": "cnn"}))


def test_a_root_without_a_manifest_names_ingest(tmp_path):
    with pytest.raises(C.ConfigError, match="jobs/ingest.py --out ROOT"):
        preflight(tiny_config(str(tmp_path / "nothing-here")))


def test_a_split_whose_every_image_failed_quotes_the_errors(tmp_path, tiny_data):
    root = str(tmp_path / "root")
    rows = [ManifestRow(image_id=f"img{i}", uri="", source=f"/x/img{i}.png", label="a", split=split, status="failed",
                        error="CorruptImageError: truncated") for i, split in enumerate(["train", "train", "test"])]
    write_manifest(root, rows, ["a"])
    with pytest.raises(C.ConfigError, match=r"Every one of the 2 images of split 'train'.*img0: CorruptImageError"):
        preflight(tiny_config(root))
    with pytest.raises(C.ConfigError, match="its splits: test, train"):
        preflight(tiny_config(tiny_data, data={"test_split": "holdout"}))


def test_a_patch_larger_than_the_images_is_refused_unless_padding_is_allowed(tiny_data):
    with pytest.raises(C.ConfigError, match=r"model.patch_hw=\[256, 256\] is larger than image .*192x192.*allow_padding"):
        preflight(tiny_config(tiny_data, model={"patch_hw": 256, "mil_stride": 0}))
    preflight(tiny_config(tiny_data, model={"patch_hw": 256, "mil_stride": 0}, data={"allow_padding": True}))


def test_more_patches_than_attention_cells(tiny_data):
    # 192 px at data.low_scale=0.25 is the 48x48 level: 2304 cells for the stride-1 attention net
    preflight(tiny_config(tiny_data, model={"n_patches": 2304}))
    with pytest.raises(C.ConfigError, match=r"n_patches=2305 .* 48x48 px .* has 2304 attention cells"):
        preflight(tiny_config(tiny_data, model={"n_patches": 2305}))
    preflight(tiny_config(tiny_data, model={"n_patches": 2305, "replace": True}))  # with replacement: any N
    with pytest.raises(C.ConfigError, match="topk evaluation reads"):
        preflight(tiny_config(tiny_data, model={"n_patches": 2305, "replace": True}, runtime={"eval_mode": "topk"}))
    with pytest.raises(C.ConfigError, match="has 144 attention cells"):  # deep_pool: stride 4, (48 / 4)^2 cells
        preflight(tiny_config(tiny_data, model={"n_patches": 145, "attention_net": "deep_pool"}))


def test_a_resume_target_with_no_epochs_left(tiny_data, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    checkpoint.save(folder, config=C.TrainConfig(), model={}, optimizer={}, epoch=3, classes=("a",), in_channels=1,
                    budget_used_s=0.0)
    preflight(tiny_config(tiny_data, optim={"epochs": 4}, runtime={"resume_from": str(folder)}))
    with pytest.raises(C.ConfigError, match="already trained 3 epochs .* Raise --epochs above 3"):
        preflight(tiny_config(tiny_data, optim={"epochs": 3}, runtime={"resume_from": str(folder)}))


def test_the_train_job_exits_2_before_starting_ray(tiny_data, tmp_path, capsys):
    from jobs import train

    assert train.main(["--data", str(tmp_path / "missing"), "--model", "ats"]) == 2
    assert train.main(["--data", tiny_data, "--model", "ats", "--set", "model.patch_hw=300", "--set", "model.mil_stride=0"]) == 2
    err = capsys.readouterr().err
    assert err.count("train: error:") == 2 and "jobs/ingest.py" in err and "allow_padding" in err
    import ray

    assert not ray.is_initialized()


def test_a_deleted_pyramid_is_named_before_ray(tiny_data, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    victim = sorted((root / "images").iterdir())[3]
    shutil.rmtree(victim)
    with pytest.raises(C.ConfigError, match=rf"1 images marked complete .* no pyramid .*first: {victim.stem}\).*"
                                            "jobs/ingest.py with the same sources"):
        preflight(tiny_config(str(root)))


def test_a_truncated_resume_checkpoint_is_a_config_error(tiny_data, tmp_path):
    def save(name: str, epoch: int):
        folder = tmp_path / name
        folder.mkdir()
        checkpoint.save(folder, config=C.TrainConfig(), model={}, optimizer={}, epoch=epoch, classes=("a",),
                        in_channels=1, budget_used_s=0.0)
        return folder

    older, newer = save("checkpoint_a", 1), save("checkpoint_b", 2)
    state = newer / checkpoint.STATE_FILE
    state.write_bytes(state.read_bytes()[:40])  # a copy cut short by a stop
    with pytest.raises(C.ConfigError, match="is damaged or incomplete .* earlier checkpoint"):
        preflight(tiny_config(tiny_data, optim={"epochs": 4}, runtime={"resume_from": str(newer)}))
    assert checkpoint.newest_loadable(tmp_path) == str(older)  # what a stopped run offers for --resume


def test_band_scaling_without_recorded_statistics_names_the_ingest_rerun(tiny_data, tmp_path):
    import dataclasses
    import shutil

    from pipeline.manifest import read_manifest

    preflight(tiny_config(tiny_data, model={"band_scaled": True}))
    rows, classes = read_manifest(tiny_data)
    root = str(tmp_path / "old")
    shutil.copytree(f"{tiny_data}/images", f"{root}/images")
    old = [dataclasses.replace(r, band_mean=(), band_std=()) for r in rows]  # a manifest written before them
    write_manifest(root, old, classes)
    with pytest.raises(C.ConfigError, match=r"per-band statistics.*Re-run jobs/ingest.py"):
        preflight(tiny_config(root, model={"band_scaled": True}))
    preflight(tiny_config(root))  # without band scaling they are not needed
    with pytest.raises(C.ConfigError, match="model.band_scaled=false for model.name=cnn"):
        tiny_config(tiny_data, model={"name": "cnn", "band_scaled": True})


def test_min_tissue_without_stored_masks_names_the_ingest_flags(tiny_data):
    with pytest.raises(C.ConfigError, match=r"no stored mask.*--mask tissue.*--mask-dir"):
        preflight(tiny_config(tiny_data, data={"min_tissue": 0.1}))

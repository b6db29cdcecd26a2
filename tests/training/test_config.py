"""Config: defaults once, YAML + overrides, validation that names the fix, flatten/round-trip."""
from __future__ import annotations

import pytest

from training import config as C


def test_defaults_round_trip_through_dict_and_yaml(tmp_path):
    cfg = C.TrainConfig()
    assert C.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "c.yaml"
    path.write_text(C.to_yaml(cfg))
    assert C.load(path) == cfg


def test_yaml_then_sections_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  n_patches: 7\n  replace: true\noptim:\n  lr: 0.01\n")
    cfg = C.load(path, ["model.n_patches=3", "runtime.eval_mode=topk"], model={"name": "uniform"})
    assert (cfg.model.n_patches, cfg.model.replace, cfg.model.name) == (3, True, "uniform")
    assert cfg.optim.lr == 0.01 and cfg.runtime.eval_mode == "topk"
    assert cfg.data == C.DataConfig()


def test_flatten_names_every_field():
    flat = C.flatten(C.TrainConfig())
    assert flat["model.n_patches"] == C.ModelConfig().n_patches
    assert flat["runtime.eval_mode"] == "sampled"
    assert flat["model.nested.n_regions"] == C.NestedConfig().n_regions  # a sub-section's fields, one level deeper
    assert len(flat) == sum(len(C.SUBSECTIONS[f.type].__dataclass_fields__) if f.type in C.SUBSECTIONS else 1
                            for s in C.SECTIONS for f in C.SECTIONS[s].__dataclass_fields__.values())


@pytest.mark.parametrize("override, fragment", [
    ("model.n_patches=0", "model: Expected n_patches >= 1"),
    ("model.name=resnet", "--model ats"),
    ("model.n_patches=ten", "Expected an integer for model.n_patches"),
    ("model.npatches=3", "Known keys of model"),
    ("modl.n_patches=3", "Known sections"),
    ("n_patches", "like model.n_patches=10"),
    ("model.mil_stride=10", "set model.mil_stride=0"),
    ("runtime.eval_mode=best", "runtime.eval_mode"),
    ("model.patch_hw=[1,2,3]", "pair"),
    ("model.smoothing=1.5", "smoothing in"),
    ("optim.select_metric=test_auc", "optim.select_metric=val_auc"),
    ("optim.select_metric=val_speed", "Unknown optim.select_metric"),
    ("optim.select_metric=val_loss", "Unknown optim.select_metric"),
    ("optim.patience=3", "set optim.select_metric=val_error"),
    ("optim.patience=-1", "optim.patience >= 0"),
    ("runtime.eval_repeats=0", "runtime.eval_repeats >= 1"),
    ("data.val_fraction=1", "Expected data.val_fraction in"),
    ("data.val_split=test", "set data.val_split=val"),
    ("data.min_tissue=1.5", "Expected data.min_tissue in"),
])
def test_invalid_values_name_the_fix(override, fragment):
    with pytest.raises(C.ConfigError, match=fragment.replace(".", r"\.").replace("(", r"\(")):
        C.load(None, [override])


def test_frozen_and_replace():
    cfg = C.TrainConfig()
    with pytest.raises(AttributeError):
        cfg.model.n_patches = 3  # type: ignore[misc]
    changed = cfg.replace(model={"n_patches": 4})
    assert changed.model.n_patches == 4 and cfg.model.n_patches == C.ModelConfig().n_patches


def test_smoke_variant_is_small():
    cfg = C.smoke(C.TrainConfig())
    assert cfg.optim.epochs == 1 and 0 < cfg.data.max_train <= 16


def test_sampling_knobs_are_defined_once_and_all_settable():
    """ModelConfig extends ATSConfig: every sampling knob (baseline_momentum and exact_budget_mb too) comes from the
    one definition, can be set, and reaches ATSModel unchanged."""
    from dataclasses import fields

    from ats_model.ats import ATSConfig

    cfg = C.load(None, ["model.baseline_momentum=0.5", "model.exact_budget_mb=64", "model.patch_hw=[24, 40]"])
    ats = cfg.model.ats_config()
    assert type(ats) is ATSConfig and (ats.baseline_momentum, ats.exact_budget_mb) == (0.5, 64.0)
    assert ats.patch_hw == (24, 40) and C.load(None, ["model.patch_hw=32"]).model.patch_hw == (32, 32)
    assert {f.name for f in fields(ATSConfig)} <= set(C.ModelConfig.__dataclass_fields__)
    assert {f.name: f.default for f in fields(ATSConfig)} == {
        f.name: f.default for f in fields(C.ModelConfig) if f.name in ATSConfig.__dataclass_fields__}
    assert C.from_dict(cfg.to_dict()) == cfg and C.load(None, ["model.plugins=a.b,c"]).model.plugins == ("a.b", "c")


def test_selection_and_validation_fields():
    cfg = C.load(None, ["optim.select_metric=val_auc", "optim.patience=3", "data.val_fraction=0.2",
                        "data.grouped=false", "runtime.eval_repeats=5"])
    assert (cfg.optim.select_metric, cfg.optim.patience, cfg.runtime.eval_repeats) == ("val_auc", 3, 5)
    assert (cfg.data.val_split, cfg.data.val_fraction, cfg.data.grouped) == ("val", 0.2, False)
    assert C.from_dict(cfg.to_dict()) == cfg
    defaults = C.TrainConfig()
    assert (defaults.optim.select_metric, defaults.optim.patience, defaults.runtime.eval_repeats) == ("", 0, 1)
    assert (defaults.data.val_fraction, defaults.data.grouped) == (0.0, True)
    for name in ("val_error", "val_balanced_accuracy", "val_recall_tumour", "train_loss"):
        assert C.load(None, [f"optim.select_metric={name}"]).optim.select_metric == name


def test_min_tissue_is_refused_for_models_that_do_not_sample_a_view():
    for name in ("nested", "deepmil", "cnn"):
        with pytest.raises(C.ConfigError, match="set data.min_tissue=0"):
            C.load(None, [f"model.name={name}", "data.min_tissue=0.25"])
    assert C.load(None, ["model.name=uniform", "data.min_tissue=0.25"]).data.min_tissue == 0.25


def test_use_gpu_given_as_a_yaml_bool_means_the_same_as_the_string():
    assert C.from_dict({"runtime": {"use_gpu": False}}).runtime.use_gpu == "false"
    assert C.from_dict({"runtime": {"use_gpu": True}}).runtime.use_gpu == "true"

"""Training configuration: one frozen dataclass per concern, defaults defined once, YAML file plus CLI overrides.

    TrainConfig(data=DataConfig(...), model=ModelConfig(...), optim=OptimConfig(...), runtime=RuntimeConfig(...))

Sources, later ones win: the defaults below, a YAML file (`--config FILE`, nested like the dataclasses), then
`--set section.field=value` overrides (values parsed as YAML scalars: `--set model.replace=true`) and the few direct
flags of jobs/train.py. The model's sampling knobs are defined once, in `ats_model.ats.ATSConfig`: `ModelConfig`
extends it (so `model.n_patches`, `model.patch_hw`, `model.exact_budget_mb`, ... are all settable) and is passed to
`ATSModel` as it is. The nested model's knobs (`model.name=nested`) are the sub-section `model.nested`
(`NestedConfig`, which extends `ats_model.nested.NestedSampling` and takes its region defaults from
`NestedATSConfig`), set as `--set model.nested.n_regions=8` or `model: {nested: {n_regions: 8}}` in YAML. Every
dataclass validates itself in `__post_init__`, with messages that name the fix. The resolved config is logged
flattened (`model.n_patches`, `model.nested.n_regions`) as MLflow params and saved as `config.yaml`, and passed to
the Ray Train workers as a plain dict (`to_dict`) that `from_dict` turns back into the dataclass.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from ats_model.ats import MODES as EVAL_MODES
from ats_model.ats import ATSConfig
from ats_model.nested import NESTED_MODES, NestedSampling
from ats_model.nets import INITS
from ats_model.nested_model import NestedATSConfig
from pipeline.resolution import Requested
from training.metrics import metric_direction

PRECISIONS = ("fp32", "bf16")  # runtime.precision: training.models.autocast
MODELS = ("ats", "uniform", "deepmil", "cnn", "nested")  # training.models builds each (its KINDS table has these keys)
SAMPLED_MODELS = ("ats", "uniform", "nested")  # the kinds that sample patches (sampled / topk / exact evaluation)
ALL_EVAL_MODES = tuple(dict.fromkeys(EVAL_MODES + NESTED_MODES))  # + exact_inner, for model.name=nested only


class ConfigError(ValueError):
    """A config value or key is invalid; the message says what to change."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True, slots=True)
class DataConfig:
    root: str = ""  # a folder or s3://bucket/prefix holding manifest.parquet (jobs/ingest.py --out ROOT)
    train_split: str = "train"
    test_split: str = "test"
    val_split: str = "val"  # the validation split, when the manifest has complete rows of it ("": never)
    val_fraction: float = 0.0  # else carve this fraction of the train split into validation (seeded by optim.seed)
    grouped: bool = True  # respect the manifest `group` (patient, site): carving never splits a group, and a
    #                       group in two of the manifest's own splits is refused (training.data.GroupLeakError)
    low_scale: float = 0.2  # the attention view: the pyramid level nearest this fraction of level 0
    cnn_scale: float = 0.2  # the CNN baseline's input: the pyramid level nearest this fraction of level 0
    batch_size: int = 16  # per worker
    max_train: int = 0  # use at most this many training images (0: all); for smoke tests
    max_test: int = 0  # also caps the validation set
    n_attention_maps: int = 4  # fixed test images whose attention is drawn every epoch
    allow_padding: bool = False  # train on patches larger than some images (mostly fill); refused otherwise
    in_memory: bool = False  # load every image's level 0 and low-res view into RAM first (small datasets only)
    prefetch: bool = True  # read the next batch's low-res views in a background thread while this step runs
    min_tissue: float = 0.0  # attention cells whose patch holds less foreground than this are never sampled (ats,
    #                          uniform); needs masks stored at ingest (jobs/ingest.py --mask / --mask-dir); 0: off
    view_um_per_px: float = 0.0  # the attention view at the level nearest this resolution, per image (ats, uniform);
    #                              0: by data.low_scale. Needs each image's resolution (manifest mpp)
    patch_um_per_px: float = 0.0  # read patches at this resolution, per image (ats, uniform): model.patch_hw are
    #                               pixels of it, so a patch spans patch_hw x this many um; 0: level-0 pixels
    view_m_per_px: float = 0.0  # the same in metres per pixel, for georeferenced rasters (set one of the two)
    patch_m_per_px: float = 0.0

    def __post_init__(self) -> None:
        _check(0 < self.low_scale <= 1, f"Expected data.low_scale in (0, 1]. Got {self.low_scale}: e.g. 0.2.")
        _check(0 < self.cnn_scale <= 1, f"Expected data.cnn_scale in (0, 1]. Got {self.cnn_scale}: e.g. 0.2.")
        _check(self.batch_size >= 1, f"Expected data.batch_size >= 1. Got {self.batch_size}.")
        _check(self.max_train >= 0 and self.max_test >= 0, "Expected data.max_train/max_test >= 0 (0 means all).")
        _check(self.n_attention_maps >= 0, f"Expected data.n_attention_maps >= 0. Got {self.n_attention_maps}.")
        _check(self.train_split != self.test_split,
               f"data.train_split and data.test_split are both {self.train_split!r}: set data.test_split=test.")
        _check(self.val_split not in (self.train_split, self.test_split),
               f"data.val_split={self.val_split!r} is also the train or test split: set data.val_split=val.")
        _check(0 <= self.val_fraction < 1,
               f"Expected data.val_fraction in [0, 1). Got {self.val_fraction}: e.g. 0.2 (0: no carving).")
        _check(0 <= self.min_tissue <= 1,
               f"Expected data.min_tissue in [0, 1]. Got {self.min_tissue}: the share of a patch that must be "
               "foreground, e.g. 0.25 (0: no masking).")
        for name in ("view_um_per_px", "patch_um_per_px", "view_m_per_px", "patch_m_per_px"):
            value = getattr(self, name)
            _check(math.isfinite(value) and value >= 0,
                   f"Expected data.{name} >= 0. Got {value}: e.g. 0.5 um/px (20x) or 10 m/px (0: off).")
        for what in ("view", "patch"):
            _check(not (getattr(self, f"{what}_um_per_px") and getattr(self, f"{what}_m_per_px")),
                   f"data.{what}_um_per_px and data.{what}_m_per_px are both set: set one (1 m = 1e6 um).")

    @property
    def view_resolution(self) -> Requested | None:
        """The view's requested resolution (data.view_um_per_px, or view_m_per_px x 1e6) with the setting it came
        from; None: the view is chosen by data.low_scale."""
        return _requested(self, "view")

    @property
    def patch_resolution(self) -> Requested | None:
        """The patches' requested resolution (data.patch_um_per_px, or patch_m_per_px x 1e6) with the setting it
        came from; None: patches are level-0 pixels."""
        return _requested(self, "patch")


def _requested(data: DataConfig, what: str) -> Requested | None:
    """The one place a `..._m_per_px` setting becomes micrometres per pixel."""
    um, m = getattr(data, f"{what}_um_per_px"), getattr(data, f"{what}_m_per_px")
    if um:
        return Requested(float(um), f"data.{what}_um_per_px")
    return Requested(float(m) * 1e6, f"data.{what}_m_per_px") if m else None


def _default(cls: type, name: str) -> Any:
    """The declared default of a dataclass field (defaults are defined once, in ats_model)."""
    return cls.__dataclass_fields__[name].default  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class NestedConfig(NestedSampling):
    """`model.nested`: the nested model's knobs (research/nested-ats.md). The sampling knobs (n_regions,
    n_patches_per_region, outer_replace, inner_replace, outer_estimator, inner_estimator, allocation,
    region_smoothing, position_smoothing) are NestedSampling's; the region geometry's defaults are NestedATSConfig's.
    The coarse view is the data.low_scale level (as ATS's view); patches are model.patch_hw level-0 px through
    model.feature_net; model.entropy_lambda and model.exact_budget_mb apply as for ATS."""

    region_px: tuple[int, int] = _default(NestedATSConfig, "region_px")  # level-0 px per region
    fine_downsample: int = _default(NestedATSConfig, "fine_downsample")  # a pyramid level's exact factor
    halo: int = _default(NestedATSConfig, "halo")  # fine px of context around a region for the fine net
    coarse_net: str = ""  # attention net on the coarse view (registry name; "": model.attention_net)
    fine_net: str = ""  # attention net on each region at the fine level ("": model.attention_net)

    def __post_init__(self) -> None:
        try:
            NestedSampling.__post_init__(self)
            NestedATSConfig(region_px=self.region_px, fine_downsample=self.fine_downsample, halo=self.halo)
        except ValueError as exc:
            raise ConfigError(f"model.nested: {exc}") from None

    def sampling(self) -> NestedSampling:
        """The sampling knobs alone, as NestedSampling."""
        return NestedSampling(**{f.name: getattr(self, f.name) for f in fields(NestedSampling)})


@dataclass(frozen=True, slots=True)
class ModelConfig(ATSConfig):
    """Which model to train, its nets and the baselines' knobs; the sampling knobs (n_patches, patch_hw, replace,
    estimator, baseline, baseline_momentum, smoothing, entropy_lambda, exact_budget_mb) are ATSConfig's."""

    name: str = "ats"  # ats | uniform (U-N: ATS with uniform attention) | deepmil | cnn | nested
    attention_net: str = "mnist_tanh"
    feature_net: str = "lenet1"
    feature_dim: int = 128
    mil_stride: int = 0  # Deep MIL grid stride in level-0 pixels, in [patch / 2, patch] per axis; 0: the patch size
    mil_hidden: int = 128
    cnn_width: int = 16
    cnn_stages: int = 4
    init: str = "torch"  # the layers' starting weights: torch (PyTorch's defaults) | glorot (Glorot-uniform weights,
    #                      zero biases: the Keras defaults of the paper's code; ats_model.nets.initialise)
    plugins: tuple[str, ...] = ()  # modules imported in every process before the model is built (custom nets)
    band_scaled: bool | None = None  # every net reads (x - mean) / std per band, the training split's manifest
    #                                  statistics; None (auto): on when a training image is not uint8 (12-bit data in
    #                                  uint16 would reach the nets near 0.03) and statistics exist, else off
    #                                  (training.data.band_scaling decides once, before the run)
    nested: NestedConfig = field(default_factory=NestedConfig)  # model.name=nested only

    def __post_init__(self) -> None:
        try:
            ATSConfig.__post_init__(self)
        except ValueError as exc:
            raise ConfigError(f"model: {exc}") from None
        _check(self.name in MODELS, f"Expected model.name in {MODELS}. Got {self.name!r}: pass --model ats.")
        _check(self.feature_dim >= 1, f"Expected model.feature_dim >= 1. Got {self.feature_dim}.")
        _check(self.init in INITS, f"Expected model.init in {INITS}. Got {self.init!r}: e.g. model.init=glorot.")
        lo, hi = (max(self.patch_hw) + 1) // 2, min(self.patch_hw)
        _check(self.mil_stride == 0 or lo <= self.mil_stride <= hi,
               f"Expected model.mil_stride in [patch/2, patch] = [{lo}, {hi}]. Got {self.mil_stride}: "
               "set model.mil_stride=0 (= the patch size).")
        _check(min(self.mil_hidden, self.cnn_width, self.cnn_stages) >= 1,
               "Expected model.mil_hidden, model.cnn_width and model.cnn_stages >= 1.")
        _check(all(isinstance(m, str) and m for m in self.plugins),
               f"Expected model.plugins as module names, e.g. [my_nets]. Got {self.plugins!r}.")
        _check(isinstance(self.nested, NestedConfig), f"Expected model.nested as a mapping. Got {self.nested!r}.")
        _check(self.band_scaled is None or isinstance(self.band_scaled, bool),
               f"Expected model.band_scaled true, false or null (auto). Got {self.band_scaled!r}.")
        _check(not (self.band_scaled and self.name == "cnn"),
               "model.band_scaled scales the attention and feature nets' input; the cnn baseline has neither: set "
               "model.band_scaled=false for model.name=cnn.")
        if self.name == "nested":  # ATS's sampling knobs would be silently ignored: name the nested ones instead
            for knob, instead in (("replace", "model.nested.outer_replace / inner_replace"),
                                  ("estimator", "model.nested.outer_estimator / inner_estimator"),
                                  ("smoothing", "model.nested.region_smoothing / position_smoothing"),
                                  ("baseline", "nothing (the nested model has no baseline)")):
                default = _default(ATSConfig, knob)
                _check(getattr(self, knob) == default,
                       f"model.{knob} is single-level ATS's and model.name=nested does not use it: set "
                       f"model.{knob}={str(default).lower() if isinstance(default, bool) else default} and use "
                       f"{instead}.")

    def ats_config(self) -> ATSConfig:
        """The sampling knobs alone, as ATSModel's config."""
        return ATSConfig(**{f.name: getattr(self, f.name) for f in fields(ATSConfig)})

    def nested_config(self) -> NestedATSConfig:
        """NestedATSModel's config: model.nested's sampling and regions, model.patch_hw / entropy_lambda /
        exact_budget_mb."""
        n = self.nested
        return NestedATSConfig(sampling=n.sampling(), region_px=n.region_px, fine_downsample=n.fine_downsample,
                               halo=n.halo, patch_hw=self.patch_hw, entropy_lambda=self.entropy_lambda,
                               exact_budget_mb=self.exact_budget_mb)


def _check_select_metric(name: str) -> None:
    """optim.select_metric: "", train_loss/train_error, or a validation metric whose direction is known."""
    if not name:
        return
    _check(not name.startswith("test_"),
           f"optim.select_metric={name!r} selects on the test split, which makes its reported numbers optimistic: "
           f"select on validation, optim.select_metric=val_{name[5:]} (with data.val_fraction=0.2 when the manifest "
           "has no val split).")
    known = name in ("train_loss", "train_error") or (name.startswith("val_") and name != "val_loss")
    try:
        metric_direction(name)
    except ValueError:
        known = False
    _check(known, f"Unknown optim.select_metric {name!r}: use val_error (lower is better), val_auc, "
                  "val_balanced_accuracy or val_recall_<class> (higher is better), or train_loss.")


@dataclass(frozen=True, slots=True)
class OptimConfig:
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.0
    clip_grad_norm: float = 0.0  # scale each step's gradient to at most this global L2 norm (e.g. 1.0; 0: off)
    class_weighted: bool = False  # weight the loss by inverse class frequency in the training split
    seed: int = 0
    time_budget_s: float = 0.0  # stop training after this many seconds of training steps (0: no budget)
    select_metric: str = ""  # the epoch a run reports: best val_error (min), val_auc, val_balanced_accuracy (max)..
    #                          "": the last epoch (training.selection)
    patience: int = 0  # stop after this many epochs without improvement of select_metric (0: never)

    def __post_init__(self) -> None:
        _check_select_metric(self.select_metric)
        _check(self.patience >= 0, f"Expected optim.patience >= 0 (0: no early stopping). Got {self.patience}.")
        _check(self.patience == 0 or bool(self.select_metric),
               f"optim.patience={self.patience} needs a metric to watch: set optim.select_metric=val_error.")
        _check(self.time_budget_s >= 0, f"Expected optim.time_budget_s >= 0 (0: none). Got {self.time_budget_s}.")
        _check(self.epochs >= 1, f"Expected optim.epochs >= 1. Got {self.epochs}.")
        _check(self.lr > 0, f"Expected optim.lr > 0. Got {self.lr}: e.g. optim.lr=0.001.")
        _check(self.weight_decay >= 0, f"Expected optim.weight_decay >= 0. Got {self.weight_decay}.")
        _check(math.isfinite(self.clip_grad_norm) and self.clip_grad_norm >= 0,
               f"Expected optim.clip_grad_norm >= 0 (0: off). Got {self.clip_grad_norm}: e.g. 1.0.")


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    address: str = ""  # Ray cluster address; "" starts an embedded local Ray (address="local")
    num_workers: int = 2  # Ray Train workers
    cpus_per_worker: float = 0.5
    use_gpu: str = "auto"  # auto | true | false
    channels_last: bool = True  # ats / uniform: the feature net in channels-last memory (1.3-1.5x faster on CPUs)
    precision: str = "fp32"  # fp32 | bf16: the forward passes under bf16 autocast (GPUs with bf16: A100, H100, ...;
    #                          the attention's softmax, sampling and the loss stay float32 as autocast keeps them)
    num_patch_servers: int = 2  # 0: each worker reads the store itself (no servers)
    server_cpus: float = 0.1  # CPU reservation of each patch server (fractional: I/O bound)
    torch_threads: int = 0  # torch intra-op threads per worker (0: torch's default)
    num_cpus: int = 0  # embedded Ray only: CPUs to give it (0: all of this machine's)
    eval_mode: str = "sampled"  # how test_error is computed each epoch: sampled | topk | exact (| exact_inner: nested)
    eval_repeats: int = 1  # sampled mode: the metrics are the mean over this many samplings, with `<name>_se`
    experiment: str = "gigapixel-ats"
    run_name: str = ""  # default: "<model>-<n_patches>-<dataset>-<time>"
    tracking_uri: str = ""  # default: $MLFLOW_TRACKING_URI, else a SQLite store under <project>/.gats
    storage_path: str = ""  # Ray Train checkpoints; default <project>/.gats/ray_results (use s3:// on a cluster)
    resume_from: str = ""  # a checkpoint directory to start from
    max_failures: int = 1  # worker-group restarts from the last checkpoint before the run fails
    progress: bool = True  # progress bars on a terminal; a line per epoch otherwise

    def __post_init__(self) -> None:
        _check(self.num_workers >= 1, f"Expected runtime.num_workers >= 1. Got {self.num_workers}.")
        _check(self.cpus_per_worker > 0, f"Expected runtime.cpus_per_worker > 0. Got {self.cpus_per_worker}.")
        _check(self.use_gpu in ("auto", "true", "false"),
               f"Expected runtime.use_gpu in auto/true/false. Got {self.use_gpu!r}.")
        _check(self.precision in PRECISIONS,
               f"Expected runtime.precision in {PRECISIONS}. Got {self.precision!r}: e.g. runtime.precision=bf16.")
        _check(self.num_patch_servers >= 0, f"Expected runtime.num_patch_servers >= 0. Got {self.num_patch_servers}.")
        _check(self.torch_threads >= 0, f"Expected runtime.torch_threads >= 0 (0: default). Got {self.torch_threads}.")
        _check(self.server_cpus >= 0, f"Expected runtime.server_cpus >= 0. Got {self.server_cpus}.")
        _check(self.num_cpus >= 0, f"Expected runtime.num_cpus >= 0 (0: all). Got {self.num_cpus}.")
        _check(self.eval_mode in ALL_EVAL_MODES,
               f"Expected runtime.eval_mode in {ALL_EVAL_MODES}. Got {self.eval_mode!r}.")
        _check(self.eval_repeats >= 1, f"Expected runtime.eval_repeats >= 1. Got {self.eval_repeats}: e.g. 5.")
        _check(self.max_failures >= 0, f"Expected runtime.max_failures >= 0. Got {self.max_failures}.")


@dataclass(frozen=True, slots=True)
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        if self.model.name not in SAMPLED_MODELS:
            _check(self.runtime.eval_mode != "topk",
                   f"runtime.eval_mode=topk applies to ats/uniform only; {self.model.name} is deterministic: "
                   "set runtime.eval_mode=exact.")
        _check(self.data.min_tissue == 0 or self.model.name in ("ats", "uniform"),
               f"data.min_tissue masks the attention cells of ats and uniform; model.name={self.model.name} has no "
               "tissue masking yet: set data.min_tissue=0.")
        asked = self.data.view_resolution or self.data.patch_resolution
        _check(asked is None or self.model.name in ("ats", "uniform"),
               f"{asked and asked.knob} picks levels by resolution for ats and uniform; "
               f"model.name={self.model.name} reads level-0 pixels: set it to 0 and use data.low_scale.")
        _check(not (self.data.patch_resolution and self.data.in_memory),
               "data.in_memory holds level 0 only, and data.patch_um_per_px / patch_m_per_px reads patches from "
               "coarser levels: set data.in_memory=false.")
        if self.model.name != "nested":
            _check(self.runtime.eval_mode in EVAL_MODES,
                   f"runtime.eval_mode={self.runtime.eval_mode} applies to model.name=nested only: set "
                   "runtime.eval_mode=exact (or sampled).")
        else:
            _check(not self.data.in_memory,
                   "data.in_memory holds level 0 only and model.name=nested reads its regions at the level of "
                   "model.nested.fine_downsample: set data.in_memory=false.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **sections: Any) -> TrainConfig:
        """A copy with some fields changed: replace(model={"n_patches": 5}, runtime={"num_workers": 1})."""
        return from_dict(merge(self.to_dict(), sections))


SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "runtime": RuntimeConfig}
SUBSECTIONS: dict[str, type] = {"NestedConfig": NestedConfig}  # fields that are sections themselves (model.nested)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """A YAML/CLI value as the field's declared type: str, int, float, bool, tuple[int, int] (an int means a square)
    or tuple[str, ...] (a list, or one comma-separated string)."""
    kind = {"str": str, "int": int, "float": float, "bool": bool}.get(annotation, annotation)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"Expected true or false for {where}. Got {value!r}.")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).lstrip("-").isdigit():
            raise ConfigError(f"Expected an integer for {where}. Got {value!r}.")
        return int(value)
    if kind is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"Expected a number for {where}. Got {value!r}.") from None
    if kind is str:  # YAML reads `use_gpu: false` (and --set runtime.use_gpu=false) as a bool: keep the word
        return "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    if kind == "tuple[int, int]":
        pair = (value, value) if isinstance(value, (int, str)) and not isinstance(value, bool) else value
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ConfigError(f"Expected an integer or a pair [h, w] for {where}. Got {value!r}: e.g. {where}=32.")
        return tuple(_coerce(v, "int", where) for v in pair)
    if kind == "tuple[str, ...]":
        items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value or ())
        return tuple(str(v).strip() for v in items)
    return value


def _section(cls: type, values: Mapping[str, Any], name: str) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"Expected a mapping for section {name!r}. Got {values!r}.")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"Unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}. "
                          f"Known keys of {name}: {', '.join(known)}.")
    kwargs = {k: _section(SUBSECTIONS[known[k].type], v, f"{name}.{k}") if known[k].type in SUBSECTIONS
              else _coerce(v, known[k].type, f"{name}.{k}") for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: {exc}") from None


def from_dict(values: Mapping[str, Any]) -> TrainConfig:
    """A TrainConfig from nested dicts (missing keys take the defaults); unknown keys are errors."""
    values = values or {}
    unknown = sorted(set(values) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"Unknown section(s) {unknown}. Known sections: {', '.join(SECTIONS)}.")
    return TrainConfig(**{name: _section(cls, values.get(name) or {}, name) for name, cls in SECTIONS.items()})


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dict merge; `update` wins."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict[str, Any]:
    """`section.key=value` -> {"section": {"key": value}} (`model.nested.key=value` one level deeper); the value is
    parsed as a YAML scalar."""
    path, sep, raw = text.partition("=")
    parts = path.strip().split(".")
    if not sep or len(parts) not in (2, 3) or not all(parts):
        raise ConfigError(f"Expected an override like model.n_patches=10 or model.nested.n_regions=8. Got {text!r}.")
    value: Any = yaml.safe_load(raw) if raw.strip() else ""
    for part in reversed(parts):
        value = {part: value}
    return value


def load(path: str | Path | None = None, overrides: Sequence[str] = (), **sections: Mapping[str, Any]) -> TrainConfig:
    """Defaults <- YAML file <- `sections` (dicts, e.g. from direct CLI flags) <- `--set` overrides."""
    values: dict[str, Any] = {}
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"Cannot read the config file {str(path)!r}: {exc}. Pass an existing YAML file.") from exc
        if loaded is not None and not isinstance(loaded, Mapping):
            raise ConfigError(f"Expected a mapping of sections in {str(path)!r} (data:, model:, ...).")
        values = dict(loaded or {})
    values = merge(values, {k: v for k, v in sections.items() if v})
    for text in overrides:
        values = merge(values, parse_override(text))
    return from_dict(values)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return list(value) if isinstance(value, tuple) else value


def to_dict(config: TrainConfig) -> dict[str, Any]:
    """Nested plain dicts with lists for tuples (what YAML and MLflow hold)."""
    return _plain(config.to_dict())


def to_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def _leaves(prefix: str, values: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        out.update(_leaves(f"{prefix}{key}.", value) if isinstance(value, Mapping) else {f"{prefix}{key}": value})
    return out


def flatten(config: TrainConfig) -> dict[str, Any]:
    """{"model.n_patches": 10, "model.nested.n_regions": 4, ...}: every field, for MLflow params."""
    return _leaves("", to_dict(config))


def smoke(config: TrainConfig) -> TrainConfig:
    """The --smoke-test variant: tiny data, one epoch, small batches; checks the wiring only."""
    return config.replace(
        data={"max_train": 8, "max_test": 4, "batch_size": 2, "n_attention_maps": 1},
        optim={"epochs": 1},
        runtime={"progress": False},
    )


"""Typed experiment configuration: YAML files in ``configs/`` loaded into dataclasses.

Every field has a default, so a YAML file names only what it changes. Loading checks each key:
an unknown key, a value of the wrong type or one outside its range raises :class:`ConfigError`
naming the file and the dotted key. ``--set a.b=c`` overrides (parsed as YAML scalars) are
applied on top of the file and checked the same way.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from fedpanfm.data.manifest import MODALITY_CODE
from fedpanfm.organs import DEFAULT_ORGANS, OrganSet
from fedpanfm.site_names import check_site_name
from fedpanfm.typed_yaml import (
    ConfigError,
    apply_override,
    build_dataclass,
    option,
    parse_override,
    read_yaml_mapping,
    to_plain,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- data


@dataclass
class OrganSpec:
    """How one organ's images are preprocessed into the grid the model sees."""

    grid: list[int] = option([16, 16, 16], lo=1, doc="target grid, 2 or 3 sizes (H, W) or (D, H, W)")
    patch: list[int] = option([8, 8, 8], lo=1, doc="patch size per axis; must divide grid")
    spacing: list[float] = option([], lo=0.0, doc="target voxel spacing in mm; [] keeps the file's")
    normalize: Literal["auto", "zscore", "foreground_zscore", "window", "minmax", "percentile", "none"] = option(
        "auto", doc="auto: CT -> window, MR -> foreground_zscore, other or unknown modality -> zscore over the "
                    "whole image (docs/data.md)")
    clip_percentiles: list[float] = option([0.5, 99.5], lo=0.0, hi=100.0)
    modality: str = option("", doc="modality (CT, MR, ...) of this organ's images where manifest.csv has no modality "
                               "cell and the file does not say (DICOM Modality); '' = unknown")
    window: list[float] = option([-160.0, 240.0], doc="[low, high] CT window in HU (normalize = window): clip, then "
                                                  "scale to [0, 1]")
    foreground_crop: bool = option(False, doc="crop to the foreground (body) box plus foreground_margin before resampling")
    foreground_margin: float = option(10.0, lo=0.0, doc="mm kept around the foreground box")
    antialias: bool = option(True, doc="Gaussian pre-filter (sigma = (factor - 1) / 2 voxels) on downsampled axes")
    frame: int = option(-1, lo=-1, doc="index along the 4th axis (time point, echo, channel) of 4D images; -1 = 4D "
                                   "images are refused")

    def check(self, where: str) -> None:
        if len(self.grid) not in (2, 3):
            raise ConfigError(f"{where}.grid: need 2 or 3 sizes, got {self.grid}")
        if len(self.patch) != len(self.grid):
            raise ConfigError(f"{where}.patch: {self.patch} must have as many axes as grid {self.grid}")
        if any(g % p for g, p in zip(self.grid, self.patch)):
            raise ConfigError(f"{where}.patch: {self.patch} must divide grid {self.grid}")
        if self.spacing and len(self.spacing) != len(self.grid):
            raise ConfigError(f"{where}.spacing: {self.spacing} must have as many axes as grid")
        if len(self.clip_percentiles) != 2 or self.clip_percentiles[0] >= self.clip_percentiles[1]:
            raise ConfigError(f"{where}.clip_percentiles: need [low, high] with low < high")
        if len(self.window) != 2 or self.window[0] >= self.window[1]:
            raise ConfigError(f"{where}.window: need [low, high] HU with low < high, got {self.window}")
        if self.modality and not MODALITY_CODE.fullmatch(self.modality):
            raise ConfigError(f"{where}.modality: {self.modality!r} is not a DICOM modality code such as CT or MR")

    @property
    def num_patches(self) -> int:
        n = 1
        for g, p in zip(self.grid, self.patch):
            n *= g // p
        return n


def _default_organ_specs() -> dict[str, OrganSpec]:
    # Our choice: dominant organs (adipose, heart) get large 2D grids and so more tokens,
    # mirroring how much image area they take in a whole-body protocol. CT windows are the usual
    # reading presets (docs/data.md): brain W80/L40, mediastinum W400/L50, fat to soft tissue,
    # abdomen W400/L40 (the OrganSpec default).
    return {
        "brain": OrganSpec(grid=[16, 16, 16], patch=[4, 4, 4], window=[0.0, 80.0]),
        "heart": OrganSpec(grid=[32, 32], patch=[4, 4], spacing=[], window=[-150.0, 250.0]),
        "adipose": OrganSpec(grid=[32, 32], patch=[4, 4], spacing=[], window=[-250.0, 150.0]),
        "liver": OrganSpec(grid=[16, 16, 16], patch=[8, 4, 4]),
        "kidney": OrganSpec(grid=[8, 16, 16], patch=[4, 4, 4]),
        "spleen": OrganSpec(grid=[8, 16, 16], patch=[4, 4, 4]),
        "pancreas": OrganSpec(grid=[8, 16, 16], patch=[4, 4, 4]),
    }


@dataclass
class DataConfig:
    """Where and how site cohorts are read."""

    extra_organs: list[str] = option([], doc="organs beyond the built-in seven")
    organs: dict[str, OrganSpec] = field(default_factory=_default_organ_specs)
    on_bad: Literal["error", "skip"] = "error"
    cache: bool = True
    cache_dir: str = option("", doc="preprocessed-array cache; '' means <site>/.fedpanfm_cache")
    memory_cache_mib: float = option(
        512.0, lo=0.0, doc="keep preprocessed subjects in RAM up to this many MiB per site and process (each "
                           "DataLoader worker its own); the first ones read stay; 0 = read every batch from disk")
    batch_size: int = option(16, lo=1)
    num_workers: int = option(0, lo=0)
    val_fraction: float = option(0.2, lo=0.0, hi=0.9, doc="held-out share of each site's subjects")

    def organ_set(self) -> OrganSet:
        return OrganSet.with_extra(self.extra_organs)


@dataclass
class SynthConfig:
    """The built-in synthetic cohort (see docs/synthetic-cohort.md)."""

    sites: int = option(4, lo=1, hi=256)
    subjects: int = option(64, lo=1, doc="subjects per site")
    seed: int = 0
    site_organs: list[list[str]] = option([], doc="organ set per site; [] uses the built-in mix")
    disease_signal: float = option(
        1.0, lo=0.0, hi=10.0, doc="scale of the disease factors' visible effect on the images (0 = invisible)"
    )
    organ_disease_signal: dict[str, float] = option(
        {}, lo=0.0, hi=10.0, doc="organ -> its own disease_signal (e.g. {heart: 1.0}); others use disease_signal"
    )
    presence: Literal["mnar", "independent"] = option(
        "mnar", doc="mnar: sicker subjects miss sessions (training cohorts); independent: each organ present "
                    "with presence_rate whatever the factors (evaluation cohorts)")
    presence_rate: float = option(0.8, lo=0.01, hi=1.0, doc="P(organ present) per protocol organ when presence = independent")


# --------------------------------------------------------------------------- model


@dataclass
class DexConfig:
    """Director-experts MLP layers (REFERENCES.md, DEX)."""

    enabled: bool = True
    experts: int = option(4, lo=1, hi=64)
    top_k: int = option(2, lo=1, hi=64)
    temperature: float = option(0.5, lo=1e-3)
    noise_std: float = option(1.0, lo=0.0, doc="initial router noise std; cosine-decays to 0")
    usage_momentum: float = option(0.99, lo=0.0, hi=1.0)
    gema_momentum_start: float = option(0.99, lo=0.0, hi=1.0)
    gema_momentum_end: float = option(0.999, lo=0.0, hi=1.0)
    distill_temperature: float = option(0.5, lo=1e-3)


@dataclass
class ModelConfig:
    dim: int = option(64, lo=8)
    depth: int = option(4, lo=1, hi=64)
    heads: int = option(4, lo=1)
    mlp_ratio: float = option(2.0, lo=0.25)
    head_hidden_dim: int = option(128, lo=8)
    head_bottleneck_dim: int = option(64, lo=8)
    head_out_dim: int = option(256, lo=8, doc="number of DINO prototypes")
    stem_channels: int = option(0, lo=0, doc="channels of the two 3x3 convolutions before each organ's patch embedding; 0 = linear patch embedding")
    organ_proj_hidden_dim: int = option(256, lo=8, doc="hidden width of the organ-contrast projector (train.loss.organ_contrast)")
    organ_proj_dim: int = option(64, lo=8, doc="output width of the organ-contrast projector")
    layerscale: float = option(0.0, lo=0.0, doc="initial per-channel scale of each residual branch (DINOv2's LayerScale, 1e-5 there); 0 = off")
    dex: DexConfig = field(default_factory=DexConfig)


# --------------------------------------------------------------------------- training


@dataclass
class MaskingConfig:
    """Whole-organ masking policy and in-organ patch masking (docs/method.md)."""

    policy: Literal["none", "random", "sgm"] = "sgm"
    organ_mask_ratio: float = option(0.3, lo=0.0, hi=0.95, doc="expected share of a subject's organs masked")
    temperature: float = option(1.0, lo=1e-3, doc="SGM softmax temperature over saliency")
    saliency_momentum: float = option(0.9, lo=0.0, hi=1.0)
    global_weight: float = option(0.5, lo=0.0, hi=1.0, doc="weight of the federation's saliency")
    patch_mask_ratio: float = option(0.3, lo=0.0, hi=0.95)


@dataclass
class LossWeights:
    dino: float = option(1.0, lo=0.0)
    ibot: float = option(1.0, lo=0.0)
    dex: float = option(0.1, lo=0.0)
    balance: float = option(0.01, lo=0.0)
    koleo: float = option(0.0, lo=0.0, doc="KoLeo spread of the student CLS (DINOv2); 0 = off")
    mae: float = option(0.0, lo=0.0, doc="masked-patch pixel reconstruction (MAE-style) from the student's masked tokens; 0 = off")
    organ_contrast: float = option(0.0, lo=0.0, doc="InfoNCE from each organ of a local view to the same organ in the "
                                                    "global views (ours, docs/method.md); 0 = off")


@dataclass
class AugmentRanges:
    """Random per-image transforms of one organ's stack (docs/method.md, "Views and augmentations")."""

    rotate_deg: float = option(15.0, lo=0.0, hi=180.0, doc="rotation angle drawn in [-x, x] degrees (each plane in 3D)")
    translate: float = option(0.1, lo=0.0, hi=0.5, doc="shift drawn in [-x, x] of each axis' length")
    scale: list[float] = option([0.9, 1.1], lo=0.1, hi=10.0, doc="[low, high] isotropic zoom factor")
    flip_axes: list[int] = option([], lo=0, hi=2, doc="grid axes flipped with probability 1/2; [] = none (anatomy has a side)")
    quarter_turns: bool = option(
        False, doc="also turn each image by a random multiple of 90 degrees in its image plane (exact, no "
        "resampling: keeps texture scale and lesion size; half turns only on non-square planes)"
    )
    gain: list[float] = option([0.9, 1.1], lo=0.0, doc="[low, high] intensity gain")
    shift: float = option(0.1, lo=0.0, doc="intensity bias drawn in [-x, x] (normalised units)")
    gamma: list[float] = option([0.8, 1.25], lo=0.05, hi=20.0, doc="[low, high] gamma of the min-max-scaled image (contrast)")
    noise_std: float = option(0.05, lo=0.0, doc="Gaussian noise std drawn in [0, x] per image")
    bias_field: float = option(0.1, lo=0.0, hi=2.0, doc="std of a smooth multiplicative log-field (3 control points per axis); 0 = off")

    def check(self, where: str) -> None:
        for name in ("scale", "gain", "gamma"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or lo_hi[0] > lo_hi[1]:
                raise ConfigError(f"{where}.{name}: need [low, high] with low <= high, got {lo_hi}")


@dataclass
class AugmentConfig:
    """Augmentation of the self-distillation views, organ by organ (``fedpanfm/augment.py``)."""

    enabled: bool = True
    ranges: AugmentRanges = field(default_factory=AugmentRanges)
    organs: dict[str, AugmentRanges] = option({}, doc="organ -> its own ranges (unset keys take the built-in defaults)")


@dataclass
class TrainConfig:
    epochs: int = option(2, lo=1, doc="local epochs (per round in a federation)")
    checkpoint_every: int = option(1, lo=1, doc="pre-training validates and checkpoints every this many epochs and "
                                                "after the last; --resume restarts after the last checkpoint")
    lr: float = option(5e-4, lo=0.0, doc="peak lr at lr_reference_batch; scaled by sqrt(effective batch / reference)")
    lr_reference_batch: int = option(16, lo=1, doc="batch at which train.lr holds (square-root rule, DINOv2)")
    min_lr: float = option(1e-5, lo=0.0)
    weight_decay: float = option(0.04, lo=0.0, doc="weight decay at step 0")
    weight_decay_end: float = option(0.4, lo=0.0, doc="weight decay at the last step (cosine, DINO)")
    warmup_fraction: float = option(0.1, lo=0.0, hi=1.0)
    freeze_last_layer_epochs: int = option(1, lo=0, doc="epochs of the run with the head's prototypes frozen (DINO)")
    local_views: int = option(2, lo=0, hi=16, doc="organ-subset (local) views per subject; 0 = two global views only")
    local_keep_ratio: list[float] = option([0.3, 0.6], lo=0.0, hi=1.0, doc="[low, high] share of its organs a local view keeps")
    local_crop: float = option(1.0, lo=0.01, hi=1.0, doc="each organ of a local view is a crop of this share of each grid "
                                                         "axis (whole patches, random offset, exact pixels); 1 = the whole image")
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    teacher_momentum_start: float = option(0.996, lo=0.0, hi=1.0)
    teacher_momentum_end: float = option(1.0, lo=0.0, hi=1.0)
    teacher_temp_start: float = option(0.04, lo=1e-3)
    teacher_temp_end: float = option(0.07, lo=1e-3)
    teacher_temp_warmup_fraction: float = option(0.3, lo=0.0, hi=1.0)
    student_temp: float = option(0.1, lo=1e-3)
    center_momentum: float = option(0.9, lo=0.0, hi=1.0)
    centering: Literal["centre", "sinkhorn_knopp"] = option(
        "centre", doc="teacher normalisation of the DINO and iBOT targets: DINO's running centre, or DINOv2's "
        "Sinkhorn-Knopp batch equipartition (3 iterations)"
    )
    organ_contrast_temp: float = option(0.2, lo=1e-3, doc="temperature of the organ-contrast InfoNCE (train.loss.organ_contrast)")
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    loss: LossWeights = field(default_factory=LossWeights)
    progress: bool = True
    cpu_threads: int = option(0, lo=0, doc="torch intra-op threads of a CPU trainer (process-wide); 0 keeps torch's default")
    devices_per_site: int = option(1, lo=1, doc="devices each site trains on, one DeepSpeed data-parallel process per device "
                                                "(data.batch_size is split across them); a site's node config key "
                                                "train-devices overrides it (docs/scale-out.md)")


@dataclass
class DeepSpeedConfig:
    """Passed through to ``deepspeed.initialize``; ``extra`` is merged in verbatim."""

    zero_stage: int = option(0, lo=0, hi=3)
    bf16: Literal["auto", True, False] = option(
        "auto", doc="bf16 autocast of the forward (weights, gradients and optimizer state stay fp32): true, false, "
                    "or auto = on where the device computes bf16 natively (CUDA, Ampere or newer), off on CPU")
    gradient_clipping: float = option(3.0, lo=0.0)
    gradient_accumulation_steps: int = option(1, lo=1)
    extra: dict[str, Any] = option({})


# --------------------------------------------------------------------------- federation


@dataclass
class RayConfig:
    """Which Ray the federation uses and what a site takes there (docs/scale-out.md)."""

    enabled: bool = True
    address: str = option("", doc="'' starts a private local Ray (even where a cluster is discoverable); 'auto', "
                              "host:port or ray://host:port joins that cluster")
    site_cpus: float = option(1.0, lo=0.01, doc="CPUs each site's Ray actor reserves in simulation (a fraction shares a "
                                            "CPU); sites training at once = the cluster's CPUs / this")
    site_gpus: float = option(-1.0, lo=-1.0, hi=1.0, doc="GPUs each site's actor reserves in simulation: 1, 1/k (k sites "
                                                     "share a GPU: 0.5, 0.25), 0 (CPU only), or -1 = auto: 0 with "
                                                     "device cpu or no GPU, else 1/ceil(sites / GPUs)")
    serial_below_mib: float = option(64.0, lo=0.0, doc="a round whose updates total fewer MiB aggregates in the server "
                                                   "process, not as Ray tasks (same result): below ~64 MiB the "
                                                   "averaging costs less than scheduling the tasks; 0 = always Ray")


@dataclass
class DPConfig:
    """Central differential privacy on the exchanged updates (docs/security.md)."""

    enabled: bool = False
    clip_norm: float = option(1.0, lo=1e-12, doc="L2 bound on each site's joint delta (every averaged float tensor "
                                             "and its organ saliency)")
    noise_multiplier: float = option(1.0, lo=0.0, doc="Gaussian noise std / sensitivity, added at the server")
    delta: float = option(1e-5, lo=1e-12, hi=0.5, doc="delta of the reported (epsilon, delta)")
    max_epsilon: float = option(0.0, lo=0.0, doc="privacy budget: the run ends (its last round checkpointed) before "
                                             "a round that would take epsilon above it; 0 = no budget")


#: Who holds the teacher between rounds (fedpanfm/federation/teacher_policy.py, docs/federation.md).
TeacherPolicy = Literal["server_ema", "aggregate", "local"]
#: Float precision of the weights on the wire (fedpanfm/federation/tensor_codec.py).
TransferDtype = Literal["fp32", "bf16"]


@dataclass
class FederationConfig:
    rounds: int = option(3, lo=1)
    min_sites: int = option(2, lo=1)
    fraction_train: float = option(1.0, lo=0.0, hi=1.0)
    round_timeout_s: float = option(3600.0, lo=1.0)
    teacher_policy: TeacherPolicy = "server_ema"
    server_teacher_momentum: float = option(0.5, lo=0.0, hi=1.0)
    transfer_dtype: TransferDtype = option(
        "fp32", doc="float precision of the weights on the wire, both ways (bf16: sites reply deltas); "
                    "bf16 halves the bytes (docs/performance.md)")
    sparse_experts: bool = option(False, doc="a site leaves out the experts it routed (almost) no gate mass to")
    sparse_expert_min_share: float = option(
        0.0, lo=0.0, hi=1.0, doc="with sparse_experts: experts below this share of a block's gate mass count as unused")
    ray: RayConfig = field(default_factory=RayConfig)
    retries: int = option(1, lo=0, doc="re-sends of a round that got fewer than min_sites usable replies")
    max_update_norm: float = option(0.0, lo=0.0, doc="reject a reply with ||update - global|| above this; 0 = off")
    max_site_subjects: int = option(100_000, lo=1, doc="reject a reply claiming more training subjects")
    site_subjects: dict[str, int] = option({}, lo=1, doc="site name -> subjects it registered; its replies may claim "
                                                   "no more (a site not listed: max_site_subjects)")
    subject_cap: float = option(3.0, lo=0.0, doc="a site's subject count weighs at most this x the round's (lower) "
                                            "median; its organ and gate-mass weights scale alike; 0 = off")
    update_norm_cap: float = option(5.0, lo=0.0, doc="clip each site's ||update - global|| to this x the round's (lower) "
                                                "median (ignored under dp, which clips to clip_norm); 0 = off")
    max_metric: float = option(1e4, lo=1.0, doc="a reply carrying a training or validation metric beyond +-this is dropped")
    robust: Literal["mean", "median", "trimmed_mean"] = "mean"
    trim_fraction: float = option(0.1, lo=0.0, hi=0.49, doc="share cut at each end per coordinate (trimmed_mean)")
    dp: DPConfig = field(default_factory=DPConfig)
    server_device: Literal["cpu", "auto", "cuda"] = option(
        "cpu", doc="where the server aggregates (means, directors, teacher EMA): auto = CUDA when the server sees a "
                   "GPU; cuda aggregates in-process even with Ray; rounds with dp stay on CPU (docs/scale-out.md)")
    cohort_statistics: bool = option(True, doc="before round 1 the server asks every site for its cohort statistics "
                                           "(aggregates only) -> <run>/cohort_statistics.csv/.json, TensorBoard")
    statistics_min_cell: int = option(5, lo=5, doc="no released statistic rests on fewer subjects (a site may ask for "
                                               "more in its node config, statistics-min-cell; docs/data.md)")


@dataclass
class LoggingConfig:
    run_dir: str = option("runs", doc="experiment runs are written under this folder")
    tensorboard: bool = True


# --------------------------------------------------------------------------- evaluation


STUDY_ARMS: tuple[str, ...] = (
    "random_init", "single_site", "centralized", "fed_none", "fed_random", "fed_sgm", "fed_sgm_nodex",
    "supervised_factors",
)


@dataclass
class StudyConfig:
    """The SGM study (``fedpanfm study``, docs/results.md): arms, seeds and the evaluation cohort."""

    seeds: list[int] = option([0, 1, 2], doc="one run of every arm per seed (init, shuffling, masks, probe split)")
    arms: list[str] = option(list(STUDY_ARMS), doc="arms to run, a subset of STUDY_ARMS")
    eval_sites: int = option(2, lo=1, hi=256, doc="full-body sites of the labelled evaluation cohort")
    eval_subjects: int = option(150, lo=4, doc="subjects per evaluation site")
    eval_seed: int = option(1000, doc="synth seed of the evaluation cohort (differs from synth.seed)")
    cpus: int = option(0, lo=0, doc="CPUs for the federated arms' Ray; 0 = all cores")
    workers: int = option(0, lo=0, doc="worker processes for the arms that train on one core (single-site "
                          "candidates, centralized, the supervised reference), side by side with the federated "
                          "arms; 0 = as many as cpus; 1 = one after another in the study's own process")
    quick: list[str] = option([], doc="KEY=VALUE overrides applied by --quick")
    primary_readout: Literal["cls", "organ_mean", "both"] = option(
        "cls", doc="encoder readout that decides macro_auroc, the same for every arm (docs/evaluation.md)")
    supervised_epochs: int = option(10, lo=1, doc="epochs at least of the supervised_factors reference over the "
                                              "training cohort (more steps than the arms' budget when needed)")
    supervised_min_subjects: int = option(768, lo=1, doc="training subjects the supervised reference needs to count as "
                                                     "the upper reference; fewer is flagged in its note")


@dataclass
class EvalConfig:
    """Linear-probe evaluation and missing-organ robustness (docs/evaluation.md)."""

    test_fraction: float = option(0.3, lo=0.05, hi=0.8, doc="share of subjects held out to score the probes")
    val_fraction: float = option(0.2, lo=0.05, hi=0.8, doc="share of subjects used to choose the L2 strength")
    l2_grid: list[float] = option([1e-4, 1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3, 1e4], lo=0.0,
                              doc="L2 strengths tried per label (extended upwards when its largest wins)")
    l2_extend: int = option(4, lo=0, doc="decades the L2 grid is extended by at most, one at a time, while its "
                                     "largest value is the strict best on validation")
    max_iter: int = option(50, lo=1, doc="Newton iterations per probe fit at most")
    probe_seed: int = option(7919, doc="offset of the probe split seed: split = probe_seed + run seed, so the split "
                                   "never shares a seed with model initialisation")
    baselines: bool = option(True, doc="score the baseline rows (presence, pixel_stats, texture_stats, pca_pixels, "
                                   "oracle, random_init) beside the encoder")
    pca_components: int = option(32, lo=1, doc="components of the pca_pixels baseline")
    bootstrap: int = option(1000, lo=0, doc="bootstrap resamples of the test set for CIs; 0 = none")
    ci_level: float = option(0.95, lo=0.5, hi=0.999)
    random_draws: int = option(3, lo=1, doc="random organ-removal draws per subject and k")
    batch_size: int = option(64, lo=1, doc="subjects per encoder forward when embedding")
    server_cohort: str = option("", doc="labelled cohort the server probes each round's global teacher on; '' = off")
    server_probe_every_round: bool = option(False, doc="probe every round even when rounds outpace the probe (they "
                                                   "queue); false: a waiting round is skipped for a newer one")
    study: "StudyConfig" = field(default_factory=lambda: StudyConfig())


@dataclass
class ExperimentConfig:
    name: str = "fedpanfm"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cohort: str = option("data/synthetic", doc="cohort folder (site folders below it)")
    data: DataConfig = field(default_factory=DataConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------- loading


def _retire_memory_cache(raw: dict[str, Any], src: str) -> None:
    """Read ``data.memory_cache`` (a switch until the twelfth session) as ``data.memory_cache_mib``.

    Every run folder and checkpoint written before stores the switch, usually ``false``; resuming
    such a run must not fail on it. ``false`` keeps nothing in RAM, as it did; ``true`` kept every
    subject, now up to the default budget.
    """
    data = raw.get("data")
    if not isinstance(data, dict) or "memory_cache" not in data:
        return
    old = data.pop("memory_cache")
    if not isinstance(old, bool):
        raise ConfigError(f"{src}: data.memory_cache = {old!r} must be true or false (the key is now "
                          "data.memory_cache_mib, a budget in MiB)")
    if old is False and "memory_cache_mib" not in data:
        data["memory_cache_mib"] = 0.0
    log.info("%s: data.memory_cache is now data.memory_cache_mib (read %r as %s MiB)", src, old,
             data.get("memory_cache_mib", "the default"))


def config_from_dict(raw: dict[str, Any], src: str = "<dict>", overrides: list[str] | None = None) -> ExperimentConfig:
    """Build and check an :class:`ExperimentConfig` from a plain mapping plus ``--set`` overrides."""
    raw = to_plain(dict(raw or {}))
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: the top level must be a mapping")
    _retire_memory_cache(raw, src)
    for text in overrides or []:
        parts, value = parse_override(text)
        apply_override(raw, parts, value, text)
    label = src if not overrides else f"{src} (with --set {' '.join(overrides)})"
    cfg = build_dataclass(ExperimentConfig, raw, "", label)
    validate(cfg, label)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a YAML experiment config (``None`` gives the defaults) and apply ``--set`` overrides."""
    if path is None:
        return config_from_dict({}, "<defaults>", overrides)
    return config_from_dict(read_yaml_mapping(path), str(path), overrides)


def config_from_run_config(run_config: Mapping[str, Any]) -> ExperimentConfig:
    """The experiment config named by a Flower run config (``[tool.flwr.app.config]``).

    Args:
        run_config: a mapping with ``config`` (path of the experiment YAML; relative paths are
            taken from the working directory) and ``overrides`` (space-separated ``KEY=VALUE``
            items, shell-quoted where a value holds spaces; may be empty); optionally
            ``config-yaml``: the experiment YAML's text, used instead of reading ``config``
            (which then only labels it) when not empty.
    """
    missing = [k for k in ("config", "overrides") if k not in run_config]
    if missing:
        raise ConfigError(
            f"Flower run config: missing key(s) {', '.join(missing)} "
            f"(have: {', '.join(map(str, run_config)) or 'none'}); set them in [tool.flwr.app.config]"
        )
    path, overrides = run_config["config"], run_config["overrides"]
    if not isinstance(path, str) or not isinstance(overrides, str):
        raise ConfigError("Flower run config: 'config' and 'overrides' must be strings")
    inline = run_config.get("config-yaml", "")
    if inline:
        # Deployment: sites share no filesystem with the coordinator, so the experiment YAML
        # travels in the run config itself (orchestration/deploy_commands.py).
        if not isinstance(inline, str):
            raise ConfigError("Flower run config: 'config-yaml' must be a string")
        try:
            raw = yaml.safe_load(inline) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"Flower run config 'config-yaml' ({path}): not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"Flower run config 'config-yaml' ({path}): the top level must be a mapping")
        return config_from_dict(raw, f"{path} (sent in the run config)", shlex.split(overrides))
    return load_config(path, shlex.split(overrides))


def validate(cfg: ExperimentConfig, src: str) -> None:
    """Checks that span several keys."""
    organs = cfg.data.organ_set()
    for name, spec in cfg.data.organs.items():
        if name not in organs:
            raise ConfigError(
                f"{src}: data.organs.{name}: unknown organ; known: {', '.join(organs)} "
                "(add new organs to data.extra_organs)"
            )
        spec.check(f"{src}: data.organs.{name}")
    missing = [o for o in organs if o not in cfg.data.organs]
    if missing:
        raise ConfigError(f"{src}: data.organs: no preprocessing spec for {', '.join(missing)}")
    for i, site in enumerate(cfg.synth.site_organs):
        for o in site:
            if o not in organs:
                raise ConfigError(f"{src}: synth.site_organs[{i}]: unknown organ {o!r}")
    for name in cfg.federation.site_subjects:
        try:
            check_site_name(name, f"{src}: federation.site_subjects")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if cfg.model.dim % cfg.model.heads:
        raise ConfigError(f"{src}: model.dim = {cfg.model.dim} must be divisible by model.heads = {cfg.model.heads}")
    lo_hi = cfg.train.local_keep_ratio
    if len(lo_hi) != 2 or lo_hi[0] > lo_hi[1]:
        raise ConfigError(f"{src}: train.local_keep_ratio: need [low, high] with low <= high, got {lo_hi}")
    if cfg.train.loss.organ_contrast > 0 and cfg.train.local_views == 0:
        raise ConfigError(f"{src}: train.loss.organ_contrast needs local views (its queries); train.local_views is 0")
    cfg.train.augment.ranges.check(f"{src}: train.augment.ranges")
    for name, ranges in cfg.train.augment.organs.items():
        if name not in organs:
            raise ConfigError(f"{src}: train.augment.organs.{name}: unknown organ; known: {', '.join(organs)}")
        ranges.check(f"{src}: train.augment.organs.{name}")
        bad = [a for a in ranges.flip_axes if a >= len(cfg.data.organs[name].grid)]
        if bad:
            raise ConfigError(f"{src}: train.augment.organs.{name}.flip_axes: axis {bad[0]} outside its {len(cfg.data.organs[name].grid)}D grid")
    if cfg.model.dex.top_k > cfg.model.dex.experts:
        raise ConfigError(f"{src}: model.dex.top_k = {cfg.model.dex.top_k} exceeds model.dex.experts")
    if cfg.federation.sparse_experts and cfg.federation.dp.enabled:
        # Central DP clips each site's whole student delta, which needs every expert it holds.
        raise ConfigError(f"{src}: federation.sparse_experts cannot be combined with federation.dp.enabled")
    gpus = cfg.federation.ray.site_gpus
    k = round(1 / gpus) if 0 < gpus < 1 else 0
    if gpus not in (-1.0, 0.0, 1.0) and (k < 2 or abs(gpus * k - 1) > 1e-3):
        # 1/k only: Flower counts GPUs / fraction actors per node, and only 1/k packs that many onto
        # the devices (0.4 on 3 GPUs: Flower starts 7 actors, Ray fits 6, one waits forever).
        raise ConfigError(f"{src}: federation.ray.site_gpus = {gpus:g}: use -1 (auto), 0, 1 or 1/k so that k sites "
                          "share a GPU (0.5, 0.25, 0.3333); a site trains on one device")


__all__ = [
    "AugmentConfig",
    "AugmentRanges",
    "ConfigError",
    "DEFAULT_ORGANS",
    "DataConfig",
    "DeepSpeedConfig",
    "DexConfig",
    "DPConfig",
    "EvalConfig",
    "ExperimentConfig",
    "FederationConfig",
    "LoggingConfig",
    "LossWeights",
    "MaskingConfig",
    "ModelConfig",
    "OrganSpec",
    "RayConfig",
    "StudyConfig",
    "SynthConfig",
    "TeacherPolicy",
    "TrainConfig",
    "TransferDtype",
    "config_from_dict",
    "config_from_run_config",
    "load_config",
]

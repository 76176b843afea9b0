"""One typed configuration tree.

Defaults live in the dataclasses below; a YAML preset from ``configs/`` is merged over them, then dotted
command-line overrides (``optim.lr=1e-3``). Unknown keys and ill-typed values are errors that name the valid
keys. The resolved tree is written into the run directory, so a run can be reproduced from it alone.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.rundir import write_atomic


class ConfigError(ValueError):
    """A configuration that cannot be used: unknown key, wrong type or invalid value."""


def _check_choice(where: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{where}={value!r} is not one of {', '.join(choices)}")


@dataclass
class RunConfig:
    name: str = "run"
    """Name of the run; the run directory is ``output_dir/name``."""
    output_dir: str = "runs"
    """Parent folder of run directories."""
    seed: int = 0
    """Seed for model init, data order and augmentation (each combined with rank/epoch/sample as needed)."""
    command: str = ""
    """The command line that started the run (filled in by ``pipeline train``/``launch`` when empty); the export's
    model card shows it."""

    @property
    def dir(self) -> Path:
        return Path(self.output_dir) / self.name


def _check_source(where: str, value: Any) -> Any:
    """The shape of a data source value (what it names is checked when it is resolved, in
    ``pipeline.data.sources``): a string, or a list of strings and ``{shards: ..., weight: ...}`` mappings."""
    def ok(item: Any, top: bool) -> bool:
        if isinstance(item, str):
            return True
        if isinstance(item, dict):
            return set(item) <= {"shards", "weight"} and isinstance(item.get("shards"), str)
        return top and isinstance(item, list) and all(ok(i, False) for i in item)

    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if value is None:
        value = ""
    if not ok(value, True):
        raise ConfigError(f"{where} must be a source (folder, pattern, URL), a list of sources, or a list of "
                          f"{{shards: SOURCE, weight: W}}; got {value!r}")
    return value


@dataclass
class DataConfig:
    train_shards: Any = ""
    """Where the training shards are: a folder written by ``pipeline shards write``, any folder of ``.tar``
    shards, one tar, a brace pattern (``/data/{00000..00099}.tar``) or glob, ``file://``, ``s3://bucket/prefix/``
    or ``s3://.../{...}.tar``, ``http(s)://.../{...}.tar``, ``pipe:COMMAND``; several joined by ``::`` or as a
    YAML list; a weighted mixture as a list of ``{shards: SOURCE, weight: W}`` (W: per-epoch repeat factor).
    See ``pipeline.data.sources``."""
    eval_train_shards: Any = ""
    """Labelled shards the kNN index and linear probe are fitted on (empty: skip eval); any source form."""
    eval_test_shards: Any = ""
    """Labelled shards the kNN and linear probe are scored on; any source form."""
    image_key: str = "auto"
    """Sample field holding the encoded image: ``auto`` takes the first of jpg, jpeg, png, webp, bmp, gif, tif,
    tiff present in each sample; or one field (``png``), or alternatives in order (``jpg;png``)."""
    label_key: str = "cls"
    """Sample field holding the integer class label (optional for pretraining), or a field of the sample's JSON
    member as ``json:FIELD`` (dotted for nested keys)."""
    text_key: str = "txt"
    """Sample field holding the caption (image+text methods): ``txt``, or a field of the JSON member as
    ``json:caption`` (dotted for nested keys)."""
    verify: str = "size"
    """Check local shards before reading: ``none``, ``size`` (against the manifest or the cached sizes: cheap,
    catches truncation and rewrites) or ``sha256`` (reads every byte; manifests of ``pipeline shards write``)."""
    cache_dir: str = ""
    """Where resolved sources (shard lists, counts) and the DALI index files of remote or read-only shards are
    cached; empty: ``$XDG_CACHE_HOME/ssl-pipeline`` (``~/.cache/ssl-pipeline``). On a cluster, a folder every
    node sees (home usually is) lets every job start without listing or counting the corpus again."""
    auto_index: int = 256
    """Most local shards without a sample count (no manifest, ``_stats.json`` or ``.idx``) that a run scans
    itself on rank 0 (the others wait); beyond that, and for remote shards, the run stops and prints the
    ``pipeline shards index`` command that counts them once. 0: never scan at start."""
    max_bad_fraction: float = 0.001
    """Undecodable or unreadable samples (counted, replaced by another sample of the same batch, reported as
    ``bad_samples`` in the metrics) tolerated as a fraction of the samples trained on; past it the run stops
    with an error naming the last bad sample. Checked on log steps over all ranks."""
    retries: int = 3
    """Retries of a failing remote read (object store or HTTP: connection errors, timeouts, 5xx, throttling)
    before the run stops with an error naming the URL."""
    retry_backoff_s: float = 1.0
    """Sleep before the first retry; doubles with each retry (capped at 60 s)."""

    def __post_init__(self) -> None:
        _check_choice("data.verify", self.verify, ("none", "size", "sha256"))
        for name in ("train_shards", "eval_train_shards", "eval_test_shards"):
            setattr(self, name, _check_source(f"data.{name}", getattr(self, name)))
        if not 0 <= self.max_bad_fraction <= 1:
            raise ConfigError(f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.retries < 0 or self.retry_backoff_s < 0 or self.auto_index < 0:
            raise ConfigError("data.retries, data.retry_backoff_s and data.auto_index must be >= 0")
        for name in ("label_key", "text_key"):
            value = getattr(self, name)
            if not value or (value.startswith("json:") and not value[5:]):
                raise ConfigError(f"data.{name} must be a field name or json:FIELD, got {value!r}")


@dataclass
class LoaderConfig:
    backend: str = "auto"
    """``auto`` (DALI wherever it is installed, else torch), ``torch`` (webdataset + torchvision), ``dali`` (DALI,
    GPU or CPU) or ``synthetic`` (random tensors)."""
    batch_size: int = 64
    """Samples per process per micro-step (the global batch is batch_size x world size)."""
    num_workers: int = 2
    """DataLoader worker processes per rank (torch backend); DALI threads for the dali backend."""
    shuffle_buffer: int = 2000
    """Samples held in the in-worker shuffle buffer (after the epoch-seeded shard-order shuffle)."""
    prefetch_factor: int = 2
    """Batches prepared ahead per worker."""
    device: str = "auto"
    """Where batches land: ``auto`` (the trainer's device), ``cpu`` or ``cuda``."""
    dali_reader: str = "auto"
    """How the DALI backend gets the shards' bytes: ``native`` (DALI's ``fn.readers.webdataset`` reads local
    files, and ``s3://`` through its AWS SDK with one ranged GET per member), ``stream`` (a reader thread streams
    each shard whole, one GET per remote shard, as the torch backend does, into DALI's ``external_source``; decode
    and augmentation stay in DALI) or ``auto`` (native for local shards, stream for remote ones: measured faster
    on S3, and the only way for ``http(s)://`` and ``pipe:``). See docs/dali.md."""

    def __post_init__(self) -> None:
        _check_choice("loader.backend", self.backend, ("auto", "torch", "dali", "synthetic"))
        _check_choice("loader.dali_reader", self.dali_reader, ("auto", "native", "stream"))
        if self.batch_size < 1:
            raise ConfigError(f"loader.batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ConfigError(f"loader.num_workers must be >= 0, got {self.num_workers}")


@dataclass
class AugmentConfig:
    recipe: str = "auto"
    """Augmentation recipe by name (see ``pipeline.data.recipes.RECIPES``); ``auto`` takes the method's own."""
    image_size: int = 224
    """Side of the (global) views fed to the model."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """Area range of random resized crops of the global views."""
    jitter_strength: float = 1.0
    """Colour jitter strength s, scaling the recipe's own jitter: brightness/contrast/saturation/hue
    (0.8, 0.8, 0.8, 0.2) x s for ``simclr`` (SimCLR), (0.4, 0.4, 0.2, 0.1) x s for ``byol`` and ``dino`` (BYOL,
    MoCo v3, Barlow Twins, VICReg, DINO)."""
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    """Gaussian blur probability (per view for symmetric recipes)."""
    solarize_prob: float = 0.0
    local_crops: int | None = None
    """Number of small local crops (DINO multi-crop); None: the recipe's default, 8 for ``dino`` (main_dino.py's
    ``--local_crops_number``), none for the others."""
    local_crop_size: int = 96
    local_crop_scale: tuple[float, float] = (0.05, 0.4)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"augment.crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")


@dataclass
class ModelConfig:
    name: str = "vit_small_patch16_224"
    """timm model name; built with ``pretrained=False``."""
    img_size: int = 224
    patch_size: int | None = None
    """Override the patch size of the timm preset (None keeps it)."""
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    drop_path_rate: float = 0.0
    global_pool: str | None = None
    """Override how the timm model pools its tokens into the feature vector (ViT: ``token`` = the class token,
    ``avg`` = mean of the patch tokens; None keeps the preset's)."""
    dynamic_img_size: bool = False
    """Accept inputs of any size (position embeddings interpolated). DINO turns it on itself when its local crops
    are smaller than the global views (its reference ViT interpolates position embeddings for every input)."""
    grad_checkpointing: bool = False
    """Activation checkpointing of the transformer blocks (applied by the engine)."""
    class_token: bool = True
    """A class token before the patch tokens (timm's ``class_token``); I-JEPA trains without one (with
    ``global_pool=avg``)."""
    fc_norm: bool | None = None
    """With ``global_pool=avg``: false keeps the final norm on every token and pools the normed tokens (I-JEPA's
    encoder and evaluation); true normalises after pooling instead (MAE's fine-tuning head); None is timm's
    choice (true for avg)."""
    reg_tokens: int = 0
    """Register tokens (Darcet et al. 2024, "Vision Transformers Need Registers"): learnt tokens appended after the
    class token that absorb the high-norm artefacts of large ViTs; timm's ``reg_tokens``. Every method treats them
    as prefix tokens (never masked, never pooled) and the export records them, so timm rebuilds the same model."""

    def __post_init__(self) -> None:
        if not self.class_token and self.global_pool in (None, "token"):
            raise ConfigError("model.class_token=false needs a pooling without it: set model.global_pool=avg")
        if self.reg_tokens < 0:
            raise ConfigError(f"model.reg_tokens must be >= 0, got {self.reg_tokens}")

    def timm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``timm.create_model`` (also written next to exported weights)."""
        kwargs: dict[str, Any] = {"img_size": self.img_size, "num_classes": 0}
        for key in ("patch_size", "embed_dim", "depth", "num_heads", "global_pool"):
            if getattr(self, key) is not None:
                kwargs[key] = getattr(self, key)
        if self.drop_path_rate:
            kwargs["drop_path_rate"] = self.drop_path_rate
        if self.dynamic_img_size:
            kwargs["dynamic_img_size"] = True
        if not self.class_token:
            kwargs["class_token"] = False
        if self.fc_norm is not None:
            kwargs["fc_norm"] = self.fc_norm
        if self.reg_tokens:
            kwargs["reg_tokens"] = self.reg_tokens
        return kwargs


@dataclass
class SimCLRConfig:
    temperature: float = 0.1
    local_loss: bool = False
    """Each rank scores only its own rows against all gathered keys (O(B x WB) instead of O(WB x WB))."""
    proj_layers: int = 2
    """Linear layers of the projection head, each followed by BatchNorm: 2 in SimCLR v1, 3 in SimCLR v2."""


FMNIST_TEMPLATES = (
    "a photo of a {}.", "a black and white photo of a {}.", "a low resolution photo of a {}.",
    "a photo of the {}, a type of clothing.", "a product photo of a {}.", "a grayscale image of a {}.",
)


@dataclass
class CLIPConfig:
    embed_dim: int = 512
    """Width of the joint image-text embedding."""
    loss: str = "infonce"
    """``infonce`` (CLIP: symmetric softmax over the global batch) or ``siglip`` (pairwise sigmoid)."""
    local_loss: bool = False
    """InfoNCE: each rank scores only its own rows against all gathered ones (same loss, B/N of the memory)."""
    init_temperature: float = 0.07
    """Initial softmax temperature (logit scale = 1/T, learnable); SigLIP starts at scale 10, bias -10."""
    max_logit_scale: float = 100.0
    """The learnable logit scale is clamped to at most this (CLIP clamps at 100)."""
    tokenizer: str = "clip_bpe"
    """``clip_bpe``: CLIP's byte-level BPE (49,408 tokens) from the vocabulary file shipped inside the
    open-clip-torch wheel, no download."""
    context_length: int = 77
    """Tokens per caption (start and end tokens included; longer captions are truncated)."""
    text_width: int = 512
    text_depth: int = 12
    text_heads: int = 8
    zero_shot_templates: tuple[str, ...] = FMNIST_TEMPLATES
    """Prompt templates for zero-shot classification; the class name replaces ``{}``."""

    def __post_init__(self) -> None:
        _check_choice("method.clip.loss", self.loss, ("infonce", "siglip"))
        if self.context_length < 3:
            raise ConfigError(f"method.clip.context_length must be >= 3, got {self.context_length}")


@dataclass
class MoCoV3Config:
    temperature: float = 0.2
    momentum: float = 0.99
    """Initial EMA momentum of the key encoder; rises to 1 along a cosine over training."""
    pred_hidden_dim: int = 4096
    proj_layers: int = 3
    stop_grad_conv1: bool = True
    """ViT encoders: keep the randomly initialised patch projection fixed (MoCo v3's ``--stop-grad-conv1``, which
    its CONFIG.md uses for every ViT: it removes the training instability the paper traces to the first layer).
    The fixed projection is exported with the encoder."""


@dataclass
class BYOLConfig:
    momentum: float = 0.996
    """Initial EMA momentum of the target network; rises to 1 along a cosine over training."""
    pred_hidden_dim: int = 4096


@dataclass
class BarlowTwinsConfig:
    lambd: float = 0.0051
    """Weight of the off-diagonal (redundancy reduction) term."""
    proj_layers: int = 3


@dataclass
class VICRegConfig:
    sim_coeff: float = 25.0
    std_coeff: float = 25.0
    cov_coeff: float = 1.0
    proj_layers: int = 3


@dataclass
class DINOConfig:
    out_dim: int = 65536
    """Prototypes (output dimension of the DINO head)."""
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    """Teacher temperature after warm-up."""
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_steps: int = 0
    """Steps of linear warm-up of the teacher temperature from ``warmup_teacher_temp`` to ``teacher_temp``."""
    center_momentum: float = 0.9
    momentum: float = 0.996
    """Initial EMA momentum of the teacher; rises to 1 along a cosine over training."""
    norm_last_layer: bool = True
    """The head's last layer has rows of norm fixed to 1 (DINO's ``--norm_last_layer``). DINO: false trains better
    but can be unstable; its authors use false for ViT-S and true for ViT-B."""
    freeze_last_layer_steps: int = 0
    """Optimizer steps during which the head's last (prototype) layer stays as initialised (DINO's
    ``freeze_last_layer``, 1 epoch in its code): its learning rate is held at 0."""


@dataclass
class MAEConfig:
    mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True
    """Targets are the pixels of each patch normalised by the patch's mean and std."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError(f"method.mae.mask_ratio must be in [0, 1), got {self.mask_ratio}")


@dataclass
class RotNetConfig:
    all_rotations: bool = True
    """Score all four rotations of every image (Gidaris et al.); false: one random rotation per image."""


# -- DINOv2 and I-JEPA (issue #15) --------------------------------------------------------------------------------


@dataclass
class DINOv2Config:
    """DINOv2's additions to DINO. The image-level DINO part (head sizes, temperatures and their warm-up, centre
    momentum, EMA momentum, last-layer freeze) is ``method.dino``; the defaults here are dinov2's
    ``ssl_default_config.yaml``."""

    centering: str = "sinkhorn_knopp"
    """How teacher outputs become targets, for the DINO and the iBOT loss: ``sinkhorn_knopp`` (SwAV's balanced
    assignment over the global batch, the DINOv2 paper's choice and its ViT-L/g configs) or ``centering`` (DINO's
    softmax around an EMA centre of the global batch, dinov2's default config)."""
    sinkhorn_iterations: int = 3
    koleo_weight: float = 0.1
    """Weight of the KoLeo regulariser on the student's class tokens of each global crop (0 disables)."""
    koleo_global_batch: bool = True
    """KoLeo's nearest neighbours among the global batch (every rank's crops); false: among this rank's only, as the
    dinov2 code does (the regulariser then depends on the per-GPU batch)."""
    ibot_weight: float = 1.0
    """Weight of iBOT's masked-patch loss (0 disables masking)."""
    ibot_out_dim: int = 65536
    """Prototypes of iBOT's own head (dinov2 ``ibot.separate_head=true``; the head is always separate here)."""
    ibot_hidden_dim: int = 2048
    ibot_bottleneck_dim: int = 256
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    """Range of the fraction of patches masked in a masked global crop (stratified over the crops of a batch)."""
    mask_probability: float = 0.5
    """Fraction of the global crops that are masked (the others only feed the DINO loss)."""
    mask_min_patches: int = 4
    """Smallest rectangle area (patches) of the block-wise mask generator."""
    mask_max_fraction: float = 0.5
    """Largest rectangle area as a fraction of the patches."""
    mask_min_aspect: float = 0.3
    """Rectangle aspect ratios are log-uniform in [min, 1/min]."""
    layerwise_decay: float = 0.9
    """Layer-wise learning-rate decay of the encoder: block i (of n) trains at decay^(n - i) of the rate, the patch
    embedding, position embedding and class and mask tokens at decay^(n + 1), the final norm and the heads at the
    full rate (dinov2 ``optim.layerwise_decay``; 1 disables)."""
    patch_embed_lr_mult: float = 0.2
    """Further factor on the patch embedding's learning rate (dinov2 ``optim.patch_embed_lr_mult``)."""

    def __post_init__(self) -> None:
        _check_choice("method.dinov2.centering", self.centering, ("sinkhorn_knopp", "centering"))
        lo, hi = self.mask_ratio
        if not 0 <= lo <= hi < 1:
            raise ConfigError(f"method.dinov2.mask_ratio must satisfy 0 <= min <= max < 1, got {self.mask_ratio}")
        if not 0 <= self.mask_probability <= 1:
            raise ConfigError(f"method.dinov2.mask_probability must be in [0, 1], got {self.mask_probability}")
        if not 0 < self.mask_min_aspect <= 1:
            raise ConfigError(f"method.dinov2.mask_min_aspect must be in (0, 1], got {self.mask_min_aspect}")
        if not (0 < self.layerwise_decay <= 1 and self.patch_embed_lr_mult > 0):
            raise ConfigError("method.dinov2.layerwise_decay must be in (0, 1] and patch_embed_lr_mult > 0, got "
                              f"{self.layerwise_decay} and {self.patch_embed_lr_mult}")


@dataclass
class IJEPAConfig:
    """I-JEPA (facebookresearch/ijepa); defaults from its ``configs/in1k_vith14_ep300.yaml``."""

    num_targets: int = 4
    """Target blocks per image, each predicted from the same context."""
    target_scale: tuple[float, float] = (0.15, 0.2)
    """Area of each target block as a fraction of the patches (one size per batch)."""
    target_aspect: tuple[float, float] = (0.75, 1.5)
    """Aspect ratio (height / width) of the target blocks."""
    context_scale: tuple[float, float] = (0.85, 1.0)
    """Area of the (square) context block, before the target patches are removed from it."""
    min_keep: int = 10
    """A context must keep more than this many patches (else it is drawn again)."""
    allow_overlap: bool = False
    """Let the context see target patches (the paper: false)."""
    predictor_dim: int = 384
    """Width of the narrow predictor transformer."""
    predictor_depth: int = 12
    predictor_heads: int = 0
    """Attention heads of the predictor (0: the encoder's, as the reference)."""
    momentum: float = 0.996
    """EMA momentum of the target encoder at step 0; rises linearly to ``momentum_end`` (the reference's schedule)."""
    momentum_end: float = 1.0

    def __post_init__(self) -> None:
        for name in ("target_scale", "context_scale"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise ConfigError(f"method.ijepa.{name} must satisfy 0 < min <= max <= 1, got {(lo, hi)}")
        if not 0 < self.target_aspect[0] <= self.target_aspect[1]:
            raise ConfigError(f"method.ijepa.target_aspect must satisfy 0 < min <= max, got {self.target_aspect}")
        if self.num_targets < 1:
            raise ConfigError(f"method.ijepa.num_targets must be >= 1, got {self.num_targets}")


# -- Pretext tasks: jigsaw puzzles and relative patch location (issue #15) ----------------------------------------


@dataclass
class JigsawConfig:
    grid: int = 3
    """Tiles per side: the view is cut into grid x grid cells, one tile from each (3: the paper's nine tiles). 2 or 3:
    the permutation set is chosen from all (grid^2)! orders."""
    tile_size: int = 64
    """Side of each tile in pixels, cut from a cell of ``augment.image_size // grid`` pixels at a random offset, so
    neighbouring tiles are separated by a random gap (the paper: 64 px tiles from the 85 px cells of a 255 px crop,
    a 21 px gap on average). The encoder sees tiles at this size: a multiple of the model's patch size (the method
    turns on ``model.dynamic_img_size`` unless it equals ``model.img_size``)."""
    num_permutations: int = 1000
    """Classes of the puzzle: how many tile orders, chosen for maximal Hamming distance (the paper's best transfer
    came from 1000; VISSL's configs use 100 to 10k)."""
    selection: str = "max_avg"
    """How the permutation set is grown, greedily from one random order: ``max_avg`` adds the order with the largest
    summed Hamming distance to those chosen (Noroozi & Favaro, Algorithm 1; VISSL's default), ``max_min`` the one
    with the largest distance to its nearest chosen order (keeps the minimum distance high)."""
    permutation_seed: int = 0
    """Seed of the first, random order of the permutation set; the rest follows deterministically."""
    channel_jitter: int = 2
    """Each colour channel of each tile is shifted by its own 0..N pixels (the authors' countermeasure against
    chromatic aberration, which otherwise tells a tile's distance from the lens centre); 0 disables."""
    normalize_tiles: bool = True
    """Normalise every tile to zero mean and unit standard deviation on its own, so low-level statistics shared by
    neighbouring tiles do not give their positions away (the paper, Sec. 3.2)."""
    tile_dim: int = 1024
    """Width of the per-tile layer after the encoder (the authors' fc6) whose outputs are concatenated."""
    hidden_dim: int = 4096
    """Width of the layer on the concatenated tiles (the authors' fc7) before the permutation classifier."""
    dropout: float = 0.5
    """Dropout after the per-tile and the joint layer, as the authors' network."""

    def __post_init__(self) -> None:
        _check_choice("method.jigsaw.selection", self.selection, ("max_avg", "max_min"))
        if self.grid not in (2, 3):
            raise ConfigError(f"method.jigsaw.grid must be 2 or 3, got {self.grid}")
        total = math.factorial(self.grid ** 2)
        if not 2 <= self.num_permutations <= total:
            raise ConfigError(f"method.jigsaw.num_permutations must be in [2, {total}] for a {self.grid}x{self.grid} "
                              f"grid, got {self.num_permutations}")
        if self.tile_size < 1 or self.channel_jitter < 0:
            raise ConfigError("method.jigsaw.tile_size must be >= 1 and channel_jitter >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"method.jigsaw.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class RelativeLocationConfig:
    patch_size: int = 96
    """Side of each image patch in pixels (not the ViT's patch): Doersch et al. sample 96 px patches. A multiple of
    the model's patch size (the method turns on ``model.dynamic_img_size`` unless it equals ``model.img_size``)."""
    gap: int = 48
    """Pixels between neighbouring patches of the 3x3 grid before jitter (the paper: half a patch), so a patch's
    edges do not continue into its neighbour's."""
    jitter: int = 7
    """Each patch is moved by up to this many pixels along each axis (the paper: 7), so lines do not line up."""
    all_neighbours: bool = False
    """False: one neighbour per image, drawn from the 8, paired with the centre patch (the paper's task). True: the
    centre patch paired with each of its 8 neighbours, 8 questions per image for 9 encoded patches."""
    color_dropping: bool = True
    """Keep one random colour channel of each patch and replace the other two with faint Gaussian noise (1/100 of
    the kept channel's standard deviation), the paper's countermeasure against chromatic aberration."""
    downsample_prob: float = 0.33
    """Fraction of patches shrunk to as few as ``min_pixels`` pixels and enlarged back (bilinear), for robustness to
    pixelation (the authors' code: a third of the patches, down to 100 pixels)."""
    min_pixels: int = 100
    normalize_patches: bool = True
    """Normalise each patch on its own (zero mean, unit root mean square) so the gradient of brightness across
    the image does not give positions away, as the authors' code."""
    hidden_dim: int = 4096
    """Width of the two layers on the concatenated pair (the authors' fc7 and fc8) before the 8-way classifier."""

    def __post_init__(self) -> None:
        if self.patch_size < 1 or self.gap < 0 or self.jitter < 0:
            raise ConfigError("method.relative_location.patch_size must be >= 1, gap and jitter >= 0")
        if not 0.0 <= self.downsample_prob <= 1.0:
            raise ConfigError(f"method.relative_location.downsample_prob must be in [0, 1], got {self.downsample_prob}")
        if not 1 <= self.min_pixels <= self.patch_size ** 2:
            raise ConfigError(f"method.relative_location.min_pixels must be in [1, patch_size^2], got {self.min_pixels}")


@dataclass
class MethodConfig:
    name: str = "simclr"
    """Self-supervised method by name (see ``pipeline.methods.METHODS``)."""
    proj_hidden_dim: int = 2048
    """Hidden width of the projection MLP (SimCLR, MoCo v3, BYOL, Barlow Twins, VICReg)."""
    proj_dim: int = 128
    """Output width of the projection MLP."""
    sync_bn: bool = True
    """BatchNorm in the heads (SimCLR, MoCo v3, BYOL, Barlow Twins, VICReg) normalises with the statistics of the global
    batch, all ranks together, as the papers' SyncBatchNorm; false: each rank's own batch (cheaper, but the
    statistics then depend on the per-rank batch size)."""
    simclr: SimCLRConfig = field(default_factory=SimCLRConfig)
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    mocov3: MoCoV3Config = field(default_factory=MoCoV3Config)
    byol: BYOLConfig = field(default_factory=BYOLConfig)
    barlow_twins: BarlowTwinsConfig = field(default_factory=BarlowTwinsConfig)
    vicreg: VICRegConfig = field(default_factory=VICRegConfig)
    dino: DINOConfig = field(default_factory=DINOConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)
    rotnet: RotNetConfig = field(default_factory=RotNetConfig)
    dinov2: DINOv2Config = field(default_factory=DINOv2Config)
    ijepa: IJEPAConfig = field(default_factory=IJEPAConfig)
    jigsaw: JigsawConfig = field(default_factory=JigsawConfig)
    relative_location: RelativeLocationConfig = field(default_factory=RelativeLocationConfig)


@dataclass
class EngineConfig:
    name: str = "ddp"
    """``ddp``, ``fsdp`` (FSDP2 fully_shard) or ``deepspeed`` (ZeRO)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage (1, 2 or 3)."""
    precision: str = "auto"
    """``fp32``, ``bf16`` (autocast) or ``auto`` (bf16 where the device supports it, else fp32)."""
    backend: str = "auto"
    """Process-group backend: ``auto`` (nccl on GPUs, gloo on CPU), ``nccl`` or ``gloo``."""
    compile: bool = False
    """``torch.compile`` the encoder blocks (GPU)."""
    reduce_dtype: str = "fp32"
    """Dtype gradients are reduced in under bf16 (``fp32`` or ``bf16``): FSDP2's ``MixedPrecisionPolicy``
    ``reduce_dtype``, DeepSpeed's ``communication_data_type``. Ignored in fp32 runs."""
    reshard_after_forward: bool = True
    """FSDP2: free each block's gathered parameters after its forward and gather again for backward (ZeRO-3
    memory); false keeps them until backward (ZeRO-2-like: more memory, one all-gather less per block)."""
    offload: str = "none"
    """DeepSpeed ZeRO-Offload: ``none``, ``optimizer`` (optimizer state and step on the CPU) or ``params``
    (optimizer and, with ZeRO-3, the parameters too). FSDP2: anything but ``none`` offloads parameters,
    gradients and optimizer state to the CPU (``CPUOffloadPolicy``). GPU runs only."""
    ds_config: dict[str, Any] = field(default_factory=dict)
    """Extra DeepSpeed config entries merged (recursively) over the one generated from this tree, for knobs the
    tree does not name, e.g. ``{zero_optimization: {stage3_param_persistence_threshold: 0}}``."""

    def __post_init__(self) -> None:
        _check_choice("engine.name", self.name, ("ddp", "fsdp", "deepspeed"))
        _check_choice("engine.precision", self.precision, ("auto", "fp32", "bf16"))
        _check_choice("engine.backend", self.backend, ("auto", "nccl", "gloo"))
        _check_choice("engine.reduce_dtype", self.reduce_dtype, ("fp32", "bf16"))
        _check_choice("engine.offload", self.offload, ("none", "optimizer", "params"))
        if self.zero_stage not in (1, 2, 3):
            raise ConfigError(f"engine.zero_stage must be 1, 2 or 3, got {self.zero_stage}")
        if self.offload == "params" and self.name == "deepspeed" and self.zero_stage != 3:
            raise ConfigError("engine.offload=params needs engine.zero_stage=3 (only ZeRO-3 partitions parameters)")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate (after warm-up)."""
    min_lr: float = 1e-6
    """Learning rate at the end of the cosine decay."""
    weight_decay: float = 0.05
    """AdamW decoupled weight decay; never applied to biases, norms, position embeddings or tokens."""
    weight_decay_end: float | None = None
    """Weight decay at the last step, reached along a cosine from ``weight_decay`` (DINO: 0.04 -> 0.4); None
    keeps ``weight_decay`` throughout."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 100
    clip_grad_norm: float = 1.0
    """Gradient-norm clipping threshold (0 disables)."""
    clip_grad_mode: str = "global"
    """``global``: scale all gradients together so their joint norm is at most ``clip_grad_norm`` (torch's
    ``clip_grad_norm_``); ``per_param``: each parameter's gradient on its own norm, as DINO's
    ``utils.clip_gradients`` (DDP and FSDP2; DeepSpeed clips globally only)."""
    accumulation_steps: int = 1
    """Micro-batches per optimizer step."""

    def __post_init__(self) -> None:
        _check_choice("optim.clip_grad_mode", self.clip_grad_mode, ("global", "per_param"))
        if self.accumulation_steps < 1:
            raise ConfigError(f"optim.accumulation_steps must be >= 1, got {self.accumulation_steps}")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if self.weight_decay_end is not None and self.weight_decay_end > 0 and self.weight_decay <= 0:
            raise ConfigError("optim.weight_decay_end needs optim.weight_decay > 0: the schedule applies to the "
                              "parameter groups that start with weight decay")


@dataclass
class TrainConfig:
    steps: int = 1000
    """Total optimizer steps. Schedules (learning rate, EMA momentum, teacher temperature) span this many steps:
    change it and a resumed run follows a different curve from there on."""
    stop_at_step: int = 0
    """Stop this run once step N is done, with a checkpoint and without export or eval, as if interrupted
    (0: run to ``steps``). Schedules still span ``steps``, so a run resumed later (``stop_at_step=0``, any
    launcher) continues exactly as an uninterrupted one would."""
    nan_policy: str = "error"
    """On a non-finite loss: ``error`` (stop with the step; checked on log and checkpoint steps, so no host
    sync per step) or ``skip`` (drop that step's update; checks every step, costing one host sync)."""
    threads: int = 0
    """torch intra-op threads per process on CPU (0: cores / local processes)."""

    def __post_init__(self) -> None:
        _check_choice("train.nan_policy", self.nan_policy, ("error", "skip"))
        if self.stop_at_step < 0:
            raise ConfigError(f"train.stop_at_step must be >= 0, got {self.stop_at_step}")


@dataclass
class CheckpointConfig:
    every_steps: int = 500
    """Save a checkpoint every N optimizer steps (and always at the end)."""
    keep_last: int = 2
    """Checkpoints kept on disk (older ones are deleted once a newer one is complete)."""
    resume: str = "auto"
    """``auto``: resume from ``latest`` if the run directory has one; ``true``: require one; ``false``: start
    fresh (refuses to overwrite a run directory with checkpoints)."""

    def __post_init__(self) -> None:
        self.resume = str(self.resume).lower()
        _check_choice("checkpoint.resume", self.resume, ("auto", "true", "false"))


@dataclass
class MetricsConfig:
    log_every: int = 10
    """Log (and check the loss for NaN) every N optimizer steps."""
    tensorboard: bool = True
    progress: bool = True
    """Progress bar on rank 0."""
    sample_keys: bool = False
    """Append the keys of every consumed batch to ``run_dir/sample_keys/rank{r}.txt`` (data audits: which
    samples each rank trained on, and when)."""


@dataclass
class EvalConfig:
    at_end: bool = True
    """Run kNN + linear probe after training when eval shards are given."""
    knn_k: tuple[int, ...] = (10, 20, 100, 200)
    """Neighbour counts the weighted kNN is scored at, each reported (dinov2 ``eval/knn.py``'s defaults)."""
    knn_temperature: float = 0.07
    """Temperature of the kNN votes' softmax over neighbour similarities (dinov2, DINO: 0.07)."""
    probe_max_iter: int = 1000
    max_train_samples: int = 0
    """Cap on samples used to fit kNN/probe (0: all)."""
    batch_size: int = 256
    baselines: bool = True
    """Also score a randomly initialised encoder and raw pixels with the same protocol."""

    def __post_init__(self) -> None:
        if not self.knn_k or any(k < 1 for k in self.knn_k):
            raise ConfigError(f"eval.knn_k must be a non-empty list of positive integers, got {list(self.knn_k)}")


@dataclass
class SlurmConfig:
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: float = 0
    """Memory per node in GiB (0: the partition's default)."""
    timeout_min: int = 60
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    exclusive: bool = False
    job_name: str = ""
    max_num_timeout: int = 3
    """How many times a job that hits its time limit is requeued."""
    signal_delay_s: int = 120
    """Seconds before the time limit at which Slurm signals the job to checkpoint."""
    folder: str = ""
    """submitit folder for scripts, pickles and logs; ``%j`` becomes the job id (default: run_dir/slurm/%j)."""
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    """Extra sbatch options, e.g. {"reservation": "foo"}."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run in the sbatch script before ``srun``, e.g. ["module load cuda/12.4"]."""

    def __post_init__(self) -> None:
        for key in ("nodes", "tasks_per_node", "cpus_per_task", "timeout_min"):
            if getattr(self, key) < 1:
                raise ConfigError(f"launcher.slurm.{key} must be >= 1, got {getattr(self, key)}")
        if self.gpus_per_node < 0 or self.mem_gb < 0 or self.max_num_timeout < 0:
            raise ConfigError("launcher.slurm.gpus_per_node, mem_gb and max_num_timeout must be >= 0")
        if not 0 <= self.signal_delay_s < self.timeout_min * 60:
            raise ConfigError(
                f"launcher.slurm.signal_delay_s={self.signal_delay_s} must be >= 0 and shorter than the time limit "
                f"({self.timeout_min} min): the job is signalled that many seconds before it is killed"
            )


@dataclass
class RayConfig:
    address: str = ""
    """Address of an existing Ray cluster (empty: start a local one)."""
    num_workers: int = 2
    cpus_per_worker: int = 1
    gpus_per_worker: int = 0
    max_failures: int = 0
    """Worker-group restarts Ray Train allows after a worker fails (-1: unlimited); each restart resumes from
    ``run_dir/checkpoints/latest``."""
    dashboard_host: str = "127.0.0.1"
    """Interface the dashboard of a local cluster binds to (needs ``ray[default]``; ignored without it)."""
    temp_dir: str = ""
    """Session folder of a local cluster (empty: Ray's default, /tmp/ray). Ray puts Unix sockets in it, so keep the
    path short."""
    local_num_cpus: int = 0
    """CPUs a local cluster offers (0: all of the machine's)."""
    local_loopback: bool = True
    """Keep a local cluster on 127.0.0.1. Ray otherwise rewrites loopback addresses to the machine's routable one
    and listens there."""

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"launcher.ray.num_workers must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0 or self.local_num_cpus < 0:
            raise ConfigError("launcher.ray.cpus_per_worker, gpus_per_worker and local_num_cpus must be >= 0")
        if self.max_failures < -1:
            raise ConfigError(f"launcher.ray.max_failures must be >= -1, got {self.max_failures}")


@dataclass
class LauncherConfig:
    name: str = "local"
    """``local`` (N processes here), ``slurm`` (submitit) or ``ray`` (Ray Train)."""
    nprocs: int = 1
    """Processes on this machine for the local launcher."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        _check_choice("launcher.name", self.name, ("local", "slurm", "ray"))


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise a ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where} is a section ({', '.join(_field_names(tp))}), got {value!r}")
        return _from_dict(tp, value, where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where} must have {len(args)} items, got {list(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        return origin(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where} must be an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return "" if value is None else str(value)
    raise ConfigError(f"{where}: unsupported type {tp}")


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = _field_names(cls)
    unknown = [k for k in data if k not in names]
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys{' of ' + where if where else ''}: {', '.join(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from exc


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["optim.lr=1e-3", "augment.crop_scale=[0.2,1]"]`` -> nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        section = next((f for f in dataclasses.fields(Config) if f.name == key), None)
        if section is not None and "name" in _field_names(section.default_factory):
            key += ".name"  # `method=byol` is short for `method.name=byol`
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({' '.join(str(exc).split())})") from None
        _set_dotted(tree, key, value)
    return tree


def _merge(base: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in other.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def config_from_dict(data: dict[str, Any]) -> Config:
    return _from_dict(Config, data)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML preset <- dotted overrides, validated into a :class:`Config`."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        data = loaded
    data = _merge(data, parse_overrides(overrides or []))
    return config_from_dict(data)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    def convert(obj: Any) -> Any:
        if isinstance(obj, tuple):
            return [convert(o) for o in obj]
        if isinstance(obj, list):
            return [convert(o) for o in obj]
        if isinstance(obj, dict):
            return {k: convert(v) for k, v in obj.items()}
        return obj

    return convert(dataclasses.asdict(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    write_atomic(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))  # `pipeline export` may be reading it

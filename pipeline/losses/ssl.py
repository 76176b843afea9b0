"""Losses of the self-supervised methods, as pure functions of features.

Two conventions for cross-rank terms, both exact under DDP's averaging of parameter gradients over W ranks:

* **local loss, gathered keys** (MoCo v3, CLIP/SigLIP with ``local_loss``): each rank scores its own rows
  against keys gathered from every rank; the mean of the W rank losses is the single-process loss on the
  concatenated batch, and ``gather_features``'s summing backward routes every rank's gradient to the key owner.
* **global loss** (CLIP without ``local_loss``, Barlow Twins, VICReg): every rank computes the same loss from
  global quantities (gathered features or statistics summed with ``all_reduce_sum``); the summing backward
  multiplies each local gradient by W and DDP divides it back.

Every loss runs in fp32 with autocast off (``fp32_loss``): logits, softmaxes and correlation matrices are never
bf16, whatever precision the engine trains in.

Formulas follow the reference code: MoCo v3 (facebookresearch/moco-v3 ``builder.py``), BYOL (``2 - 2 cos``),
Barlow Twins (facebookresearch/barlowtwins ``main.py``), VICReg (facebookresearch/vicreg ``main_vicreg.py``),
DINO (facebookresearch/dino ``DINOLoss``), MAE (facebookresearch/mae ``models_mae.py``), CLIP (open_clip
``ClipLoss``) and SigLIP (open_clip ``SigLipLoss``; Zhai et al. 2023).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.losses.gather import (
    all_reduce_max_no_grad,
    all_reduce_sum,
    all_reduce_sum_no_grad,
    gather_features,
    world,
)
from pipeline.losses.precision import fp32_loss


def off_diagonal(m: torch.Tensor) -> torch.Tensor:
    """The off-diagonal entries of a square matrix, flattened."""
    n = m.shape[0]
    return m.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


# ---------------------------------------------------------------------------------------------------------------
# Contrastive


@fp32_loss
def moco_infonce(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3: local queries against keys of the global batch, positive at ``rank * B + i``, scaled by 2T.

    ``k`` comes from the momentum encoder (no gradient); each rank returns the loss of its own queries.
    """
    rank, _ = world()
    q = F.normalize(q, dim=1)
    k = F.normalize(gather_features(k.detach()), dim=1)
    logits = q @ k.T / temperature
    labels = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]
    return F.cross_entropy(logits, labels) * (2 * temperature)


@fp32_loss
def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, local_loss: bool = False
              ) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch (open_clip ``ClipLoss``); ``img``, ``txt`` L2-normalised.

    ``local_loss=False``: every rank builds the full N x N logits (identical loss everywhere).
    ``local_loss=True``: each rank scores only its B images (texts) against all N texts (images), labels offset
    by ``rank * B``; the mean over ranks is the same loss, at B/N of the memory.
    """
    rank, _ = world()
    all_img, all_txt = gather_features(img), gather_features(txt)
    if local_loss:
        labels = torch.arange(img.shape[0], device=img.device) + rank * img.shape[0]
        logits_img = logit_scale * img @ all_txt.T
        logits_txt = logit_scale * txt @ all_img.T
    else:
        labels = torch.arange(all_img.shape[0], device=img.device)
        logits_img = logit_scale * all_img @ all_txt.T
        logits_txt = logits_img.T
    return (F.cross_entropy(logits_img, labels) + F.cross_entropy(logits_txt, labels)) / 2


@fp32_loss
def siglip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor
                ) -> torch.Tensor:
    """Sigmoid loss: -(1/B) sum_i sum_j log sigmoid(z_ij (t x_i . y_j + b)), z_ij = 1 if i == j else -1.

    Each rank scores its B images against all N texts (gathered with autograd; the paper's ring exchange
    computes the same sum); the mean over ranks is the single-process loss on the concatenated batch.
    """
    rank, _ = world()
    all_txt = gather_features(txt)
    logits = logit_scale * img @ all_txt.T + logit_bias
    b = img.shape[0]
    signs = -torch.ones_like(logits)
    idx = torch.arange(b, device=img.device)
    signs[idx, idx + rank * b] = 1.0
    return -F.logsigmoid(signs * logits).sum() / b


# ---------------------------------------------------------------------------------------------------------------
# Distillation without negatives


@fp32_loss
def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Normalised MSE ``2 - 2 cos(p, z)`` per sample, averaged; ``z`` (the target) is detached."""
    p, z = F.normalize(p, dim=-1), F.normalize(z.detach(), dim=-1)
    return (2 - 2 * (p * z).sum(dim=-1)).mean()


@fp32_loss
def dino_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor,
              student_temp: float, teacher_temp: float) -> torch.Tensor:
    """DINO cross-entropy between the centred, sharpened teacher on each global view and the student on every
    other view, averaged over the (teacher view, student view) pairs. All per-sample: no cross-rank term."""
    targets = [F.softmax((t.detach() - center) / teacher_temp, dim=-1) for t in teacher]
    return dino_cross_entropy(student, targets, student_temp)


@fp32_loss
def dino_cross_entropy(student: list[torch.Tensor], targets: list[torch.Tensor], student_temp: float) -> torch.Tensor:
    """Cross-entropy of the student's softmax on each view against the teacher's target distribution of each other
    global view, averaged over the (teacher view, student view) pairs: DINO's loss once the teacher's outputs are
    turned into targets (centred softmax in DINO, Sinkhorn-Knopp in DINOv2). Per-sample: no cross-rank term."""
    logps = [F.log_softmax(s / student_temp, dim=-1) for s in student]
    total, terms = 0.0, 0
    for iq, q in enumerate(targets):
        for v, logp in enumerate(logps):
            if v == iq:
                continue
            total = total + (-q.detach() * logp).sum(dim=-1).mean()
            terms += 1
    return total / terms


@torch.no_grad()
def dino_batch_center(teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean teacher output over all global views of the global batch (summed over ranks, no gradient)."""
    out = torch.cat(teacher).float()
    _, ws = world()
    return all_reduce_sum_no_grad(out.sum(dim=0, keepdim=True)) / (out.shape[0] * ws)


# ---------------------------------------------------------------------------------------------------------------
# Redundancy reduction with global batch statistics


def _global_count(x: torch.Tensor) -> int:
    _, ws = world()
    return x.shape[0] * ws  # the loaders give every rank the same batch size


def global_standardize(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(z - mean) / sqrt(var + eps) with the mean and biased variance of the global batch (what a synced
    BatchNorm without affine does in training), differentiable through both statistics."""
    n = _global_count(z)
    mean = all_reduce_sum(z.sum(dim=0)) / n
    var = all_reduce_sum(((z - mean) ** 2).sum(dim=0)) / n
    return (z - mean) / torch.sqrt(var + eps)


@fp32_loss
def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 0.0051) -> torch.Tensor:
    """sum_i (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2, with C the cross-correlation of the two views'
    embeddings standardised over the global batch: C = sum_n z1n^T z2n / N."""
    z1, z2 = global_standardize(z1), global_standardize(z2)
    c = all_reduce_sum(z1.T @ z2) / _global_count(z1)
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    return on_diag + lambd * off_diagonal(c).pow(2).sum()


@fp32_loss
def vicreg_loss(x: torch.Tensor, y: torch.Tensor, sim_coeff: float = 25.0, std_coeff: float = 25.0,
                cov_coeff: float = 1.0, eps: float = 1e-4) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """VICReg: invariance (MSE), variance (hinge on the std of each dimension) and covariance (squared
    off-diagonal covariances / D), every term over the global batch. Returns the loss and its three terms."""
    n, d = _global_count(x), x.shape[1]
    invariance = all_reduce_sum((x - y).pow(2).sum()) / (n * d)
    std_loss, cov_loss = 0.0, 0.0
    for z in (x, y):
        zc = z - all_reduce_sum(z.sum(dim=0)) / n
        cov = all_reduce_sum(zc.T @ zc) / (n - 1)  # unbiased, as torch.var and the reference code
        std = torch.sqrt(torch.diagonal(cov) + eps)
        std_loss = std_loss + F.relu(1 - std).mean() / 2
        cov_loss = cov_loss + off_diagonal(cov).pow(2).sum() / d
    loss = sim_coeff * invariance + std_coeff * std_loss + cov_coeff * cov_loss
    return loss, {"invariance": invariance.detach(), "variance": std_loss.detach(), "covariance": cov_loss.detach()}


# ---------------------------------------------------------------------------------------------------------------
# Reconstruction


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """N x C x H x W -> N x L x (p * p * C), patches in row-major order, pixels as (p, p, C) (MAE's layout)."""
    n, c, h, w = imgs.shape
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)


@fp32_loss
def mae_loss(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int,
             norm_pix: bool = True) -> torch.Tensor:
    """Mean squared error on the masked patches (``mask`` 1 = removed); targets normalised per patch by their
    mean and (unbiased) variance when ``norm_pix``."""
    target = patchify(imgs, patch_size)
    if norm_pix:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = (pred - target).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


# ---------------------------------------------------------------------------------------------------------------
# DINOv2 (facebookresearch/dinov2 ``loss/``): Sinkhorn-Knopp teacher, iBOT patch loss, KoLeo; I-JEPA's latent loss


@fp32_loss
@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, teacher_temp: float | torch.Tensor, iterations: int = 3) -> torch.Tensor:
    """Teacher targets by Sinkhorn-Knopp over the global batch (dinov2 ``sinkhorn_knopp_teacher``, from SwAV):
    Q = exp(logits / T) of this rank's n rows, scaled so that over all ranks' rows every prototype gets 1/K of the
    mass and every row 1/N, alternately, ``iterations`` times; returns this rank's n rows, each summing to 1.

    The total and the per-prototype sums are summed over ranks, and N counts every rank's rows (ranks may hold
    different numbers, as iBOT's masked patches do), exactly as the reference's all-reduces: the result equals one
    process on the concatenated rows. Deviation, for fp32 range only: the logits are shifted by their global
    maximum before exp (the first normalisation cancels any common factor)."""
    x = logits.float() / teacher_temp
    top = x.max() if x.numel() else torch.full((), float("-inf"), device=x.device)
    q = torch.exp(x - all_reduce_max_no_grad(top)).t()  # K x n
    k = q.shape[0]
    n = all_reduce_sum_no_grad(q.new_full((), q.shape[1]))  # new_full, not torch.tensor: no host-device copy
    q /= all_reduce_sum_no_grad(q.sum())
    tiny = torch.finfo(q.dtype).tiny  # a prototype no row reaches stays 0 instead of 0/0
    for _ in range(iterations):
        q /= all_reduce_sum_no_grad(q.sum(dim=1, keepdim=True)).clamp_min(tiny) * k
        q /= q.sum(dim=0, keepdim=True).clamp_min(tiny) * n
    return (q * n).t()


@fp32_loss
@torch.no_grad()
def global_row_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of the rows of ``x`` over every rank's rows (ranks may hold different numbers of rows), 1 x D."""
    x = x.float()
    total = all_reduce_sum_no_grad(torch.cat([x.sum(dim=0), x.new_full((1,), x.shape[0])]))
    return (total[:-1] / total[-1].clamp_min(1)).unsqueeze(0)


@fp32_loss
def ibot_patch_loss(student: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, n_crops: int,
                    student_temp: float) -> torch.Tensor:
    """iBOT's masked-patch loss (dinov2 ``iBOTPatchLoss.forward_masked``): the cross-entropy of the student's
    softmax on each masked patch (M x K, all masked patches of this rank's crops) against the teacher's target on
    the same patch, weighted by 1 / (masked patches of its crop), summed and divided by the crops on this rank
    (``n_crops``, masked or not). Per-crop terms over an equal number of crops per rank: the mean over ranks is
    the loss of the global batch."""
    ce = -(targets.detach() * F.log_softmax(student.float() / student_temp, dim=-1)).sum(dim=-1)
    return (ce * weights).sum() / n_crops


@fp32_loss
def koleo_loss(x: torch.Tensor, global_batch: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo regulariser (Sablayrolles et al. 2019; dinov2 ``KoLeoLoss``): -mean_i log ||x_i - x_nn(i)|| of the
    L2-normalised rows, nn(i) being row i's nearest other row.

    ``global_batch=True`` searches the nearest neighbour among the rows of every rank (gathered with autograd, so a
    neighbour on another rank receives its gradient), and each rank averages over its own rows: the mean over
    ranks is the single-process loss on the concatenated batch, whatever the per-GPU batch. Deviation: dinov2
    searches each rank's own rows only (``global_batch=False``), which makes the regulariser depend on the per-GPU
    batch size."""
    x = F.normalize(x.float(), dim=-1, eps=eps)
    rank, ws = world()
    everyone, offset = (gather_features(x), rank * x.shape[0]) if global_batch and ws > 1 else (x, 0)
    with torch.no_grad():
        dots = x @ everyone.t()
        rows = torch.arange(x.shape[0], device=x.device)
        dots[rows, rows + offset] = -1.0  # not oneself (the reference fills the diagonal with -1 too)
        nn_idx = dots.argmax(dim=1)
    dist = (x - everyone[nn_idx] + eps).norm(dim=-1)  # torch.nn.PairwiseDistance(2, eps) as the reference
    return -torch.log(dist + eps).mean()


@fp32_loss
def ijepa_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """I-JEPA's loss (ijepa ``train.py``): smooth L1 (beta 1) between the predicted and the target latents,
    averaged over every element of the global batch. Each rank divides the sum of its own elements by the global
    count (one all-reduce of a scalar, no gradient) times W, so the mean over ranks is the global mean even where
    ranks predict different numbers of patches (each rank draws its own block sizes)."""
    _, ws = world()
    total = F.smooth_l1_loss(pred.float(), target.detach().float(), reduction="sum", beta=1.0)
    count = all_reduce_sum_no_grad(total.new_full((), target.numel()).detach())
    return total * ws / count

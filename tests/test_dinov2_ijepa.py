"""DINOv2 and I-JEPA beyond what tests/test_methods.py checks for every method (forward/backward, EMA teachers, loss
decrease on a fixed batch, exact resume, export into timm, presets):

- the losses against the reference code, transcribed here for one process (dinov2 ``loss/``, ijepa ``train.py``);
- the masks against their definitions: iBOT's block-wise masks (rectangles, aspect, ratio strata, masked fraction
  of the crops) and I-JEPA's blocks (sizes, every position reachable, context disjoint from targets, equal kept
  counts across the batch by min-keep truncation);
- the masked encoders (mask token, dropped patches, prefix tokens);
- the global terms on 2 gloo ranks against one process on the concatenated batch: Sinkhorn-Knopp with unequal rows
  per rank, the centres, KoLeo's gathered neighbours, I-JEPA's global normaliser, and whole-method losses and
  gradients (with per-rank KoLeo shown to differ, so the comparison can fail).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.data.loader import Batch
from pipeline.losses import ssl
from pipeline.methods import build_method
from pipeline.methods.masking import block_mask, block_size, ibot_masks, multiblock, multiblock_masks
from pipeline.models import vit_tokens
from tests.multirank import run_ranks
from tests.test_methods import random_batch, tiny_config

# ---------------------------------------------------------------------------------------------------------------
# The reference code, one process (dinov2 loss/*.py with dist.* removed; ijepa src/train.py)


def ref_sinkhorn(teacher_output, teacher_temp, n_iterations=3):
    Q = torch.exp(teacher_output.float() / teacher_temp).t()
    B, K = Q.shape[1], Q.shape[0]
    Q /= torch.sum(Q)
    for _ in range(n_iterations):
        Q /= torch.sum(Q, dim=1, keepdim=True)
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def ref_koleo(student_output, eps=1e-8):
    x = F.normalize(student_output, eps=eps, p=2, dim=-1)
    dots = torch.mm(x, x.t())
    n = x.shape[0]
    dots.view(-1)[:: (n + 1)].fill_(-1)
    _, idx = torch.max(dots, dim=1)
    distances = torch.nn.PairwiseDistance(2, eps=1e-8)(x, x[idx])
    return -torch.log(distances + eps).mean()


def ref_ibot_forward_masked(s, t, masks, student_temp=0.1):
    loss = torch.sum(t * F.log_softmax(s / student_temp, dim=-1), dim=-1)
    weights = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    return -(loss * weights).sum() / masks.shape[0]


def test_sinkhorn_knopp_matches_the_reference_and_balances():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 7, generator=g)
    got = ssl.sinkhorn_knopp(logits, 0.1)
    torch.testing.assert_close(got, ref_sinkhorn(logits, 0.1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.sum(1), torch.ones(12))  # each row is an assignment
    more = ssl.sinkhorn_knopp(logits, 1.0, iterations=200)  # converged: every prototype gets N/K of the mass
    torch.testing.assert_close(more.sum(0), torch.full((7,), 12 / 7), rtol=1e-4, atol=1e-5)
    # the global-maximum shift keeps large logits finite where the reference's exp overflows
    big = ssl.sinkhorn_knopp(logits * 100, 0.04)
    assert torch.isfinite(big).all() and not torch.isfinite(ref_sinkhorn(logits * 100, 0.04)).all()


def test_koleo_and_ibot_losses_match_the_reference():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 6, generator=g)
    assert ssl.koleo_loss(x).item() == pytest.approx(ref_koleo(x).item(), rel=1e-6)
    xs = x.clone().requires_grad_()
    xr = x.clone().requires_grad_()
    ssl.koleo_loss(xs).backward()
    ref_koleo(xr).backward()
    torch.testing.assert_close(xs.grad, xr.grad)

    masks = torch.zeros(4, 9, dtype=torch.bool)
    masks[0, [1, 2, 5]] = True
    masks[2, [0, 8]] = True  # crops 1 and 3 unmasked: they count in the divisor, as the reference's
    m = int(masks.sum())
    s, t = torch.randn(m, 5, generator=g), F.softmax(torch.randn(m, 5, generator=g), dim=-1)
    weights = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    assert ssl.ibot_patch_loss(s, t, weights, 4, 0.1).item() == pytest.approx(
        ref_ibot_forward_masked(s, t, masks).item(), rel=1e-6)


def test_dino_cross_entropy_pairs_each_student_view_with_the_other_global_views():
    """DINOv2's global-crop loss matches crop A with teacher B and B with A (its reversed teacher chunks), locals
    with both, normalised by the number of pairs: that is DINO's pairing over a list of targets."""
    g = torch.Generator().manual_seed(2)
    student = [torch.randn(3, 8, generator=g) for _ in range(4)]  # 2 global + 2 local
    targets = [F.softmax(torch.randn(3, 8, generator=g), dim=-1) for _ in range(2)]

    def ce(t, s):
        return -(t * F.log_softmax(s / 0.1, dim=-1)).sum(-1).mean()

    # ssl_meta_arch: local loss sums over (local, teacher) pairs, global loss = CE over the 2B reversed pairs x 2
    local = sum(ce(t, s) for s in student[2:] for t in targets)
    glob = 2 * ce(torch.cat([targets[1], targets[0]]), torch.cat(student[:2]))
    expected = (local + glob) / (2 + 2 * 2)
    assert ssl.dino_cross_entropy(student, targets, 0.1).item() == pytest.approx(expected.item(), rel=1e-6)


def test_ijepa_loss_is_smooth_l1_mean():
    g = torch.Generator().manual_seed(3)
    z, h = torch.randn(2, 4, 3, 8, generator=g) * 2, torch.randn(2, 4, 3, 8, generator=g)
    assert ssl.ijepa_loss(z, h).item() == pytest.approx(F.smooth_l1_loss(z, h).item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Masks against their definitions


def test_block_mask_is_a_union_of_valid_rectangles():
    rng = np.random.default_rng(0)
    grid, n_patches = (14, 14), 196
    short = 0
    for trial in range(300):
        target = int(n_patches * rng.uniform(0.1, 0.5))
        mask, blocks = block_mask(rng, grid, target, min_patches=4, max_patches=98, min_aspect=0.3)
        union = np.zeros(grid, dtype=bool)
        for b in blocks:
            assert 0 < b.height < 14 and 0 < b.width < 14, b  # strictly smaller than the grid
            assert 0 <= b.top <= 14 - b.height and 0 <= b.left <= 14 - b.width, b
            assert b.height * b.width <= 98 + 14, b  # area <= max_patches, up to rounding of the sides
            # log-uniform aspect in [0.3, 1/0.3], up to rounding of the sides
            assert (b.height + 0.5) / max(b.width - 0.5, 0.5) >= 0.3 and (b.height - 0.5) / (b.width + 0.5) <= 1 / 0.3
            new = b.height * b.width - union[b.top:b.top + b.height, b.left:b.left + b.width].sum()
            assert new > 0, "every rectangle adds patches"
            union[b.top:b.top + b.height, b.left:b.left + b.width] = True
        assert np.array_equal(mask, union)
        assert mask.sum() <= target
        short += mask.sum() < target
    assert short < 0.15 * 300  # the generator reaches its count almost always (measured: ~7% short by a few)


def test_ibot_masks_stratify_ratios_over_the_masked_crops():
    rng = np.random.default_rng(1)
    n, grid = 64, (14, 14)
    masks, targets = ibot_masks(n, grid, (0.1, 0.5), 0.5, rng=rng)
    assert masks.shape == (64, 196) and masks.dtype == torch.bool
    masked = targets > 0
    assert int(masked.sum()) == 32 and not masks[~masked].any()  # int(n x probability) crops masked, the rest not
    assert (masks.sum(1) <= targets).all() and (masks[masked].sum(1) > 0).all()
    bounds = np.linspace(0.1, 0.5, 33)  # masked crop i asked for a ratio in the i-th of 32 equal sub-ranges
    for i, t in enumerate(sorted(targets[masked].tolist())):
        assert int(196 * bounds[i]) <= t <= int(196 * bounds[i + 1]), (i, t)
    assert masks[masked].sum(1).float().div(targets[masked]).mean() > 0.95
    assert not torch.equal(masked, masked.sort(descending=True).values)  # shuffled, not masked-first


def test_ijepa_block_sizes_follow_their_definition():
    g = torch.Generator().manual_seed(0)
    for _ in range(500):
        h, w = block_size((0.15, 0.2), (0.75, 1.5), (14, 14), g)
        assert 1 <= h < 14 and 1 <= w < 14
        assert int(196 * 0.15) - 2 * 14 <= h * w <= int(196 * 0.2) + 2 * 14  # area up to rounding of the sides
        assert 0.75 * (w - 0.5) / (w + 0.5) - 0.2 <= h / w <= 1.5 * (w + 0.5) / (w - 0.5) + 0.2
        ch, cw = block_size((0.85, 1.0), (1.0, 1.0), (14, 14), g)
        assert ch == cw and 12 <= ch <= 13  # square; at most one patch short of the grid, as the reference


def test_ijepa_masks_context_disjoint_from_targets_and_truncated_equally():
    g = torch.Generator().manual_seed(0)
    grid = (14, 14)
    seen_tops = set()
    for _ in range(20):
        context, targets = multiblock(16, grid, min_keep=10, generator=g)
        assert context.shape == (16, 196) and targets.shape == (16, 4, 196)
        assert not (context.unsqueeze(1) & targets).any(), "context overlaps a target block"
        assert (context.sum(1) > 10).all()
        areas = targets.sum(2)
        assert (areas == areas[0, 0]).all(), "one target block size per batch"
        for t in targets.view(-1, 14, 14):  # each target is a full rectangle inside the grid
            rows, cols = t.any(1).nonzero().flatten(), t.any(0).nonzero().flatten()
            assert t[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
            assert int(t.sum()) == len(rows) * len(cols)
            seen_tops.add((int(rows.min()), len(rows)))
        ctx_idx, tgt_idx = multiblock_masks(16, grid, min_keep=10, generator=torch.Generator().manual_seed(5))
        c, t = multiblock(16, grid, min_keep=10, generator=torch.Generator().manual_seed(5))
        kc = int(c.sum(1).min())
        assert ctx_idx.shape == (16, kc) and tgt_idx.shape == (16, 4, int(t.sum(2).min()))
        for i in range(16):  # the first kc context patches of each image, in row-major order (nonzero()[:kc])
            assert ctx_idx[i].tolist() == c[i].nonzero().flatten()[:kc].tolist()
    # every top row a block of its height fits at, the last one included
    for top, height in seen_tops:
        assert 0 <= top <= 14 - height
    assert any(top == 14 - height for top, height in seen_tops)


def test_ijepa_context_fallback_on_a_small_grid_and_clear_error():
    """On a 7x7 grid a 6x6 context minus four targets often keeps too few patches: after 20 failures the last
    target stops constraining it (the reference's fallback), so every context still keeps more than min_keep."""
    g = torch.Generator().manual_seed(0)
    context, targets = multiblock(32, (7, 7), min_keep=4, generator=g)
    assert (context.sum(1) > 4).all() and not (context.unsqueeze(1) & targets).any()
    context, targets = multiblock(32, (7, 7), min_keep=20, generator=g)
    assert (context.sum(1) > 20).all()
    overlaps = (context.unsqueeze(1) & targets).any(2)  # n x T
    assert overlaps.any(), "no context needed the fallback"
    assert overlaps[:, -1].sum() >= overlaps[:, 0].sum()  # blocks stop constraining from the last one
    with pytest.raises(ValueError, match="min_keep"):
        multiblock(2, (4, 4), min_keep=10, generator=g)


# ---------------------------------------------------------------------------------------------------------------
# Masked encoders


def test_vit_tokens_mask_token_and_kept_patches_with_prefix_tokens():
    """The mask token replaces patch embeddings before the position embedding: with the token set to the embedding of
    an all-zero patch, masking equals zeroing those pixels. Kept patches: with every patch kept, forward_features;
    prefix tokens (class + 4 registers) always stay in front."""
    import timm

    torch.manual_seed(0)
    enc = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=28, patch_size=7,
                            embed_dim=32, depth=2, num_heads=2, reg_tokens=4).eval()
    assert enc.num_prefix_tokens == 5
    x = torch.randn(2, 3, 28, 28)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [0, 5, 15]] = True
    mask[1, [3]] = True
    zeroed = x.clone().view(2, 3, 4, 7, 4, 7)
    for i, j in mask.nonzero().tolist():
        zeroed[i, :, j // 4, :, j % 4, :] = 0
    with torch.no_grad():
        token = enc.patch_embed.proj.bias.view(1, -1)
        torch.testing.assert_close(vit_tokens(enc, x, mask=mask, mask_token=token),
                                   enc.forward_features(zeroed.view(2, 3, 28, 28)), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vit_tokens(enc, x, keep=torch.arange(16).expand(2, 16)), enc.forward_features(x),
                                   rtol=1e-5, atol=1e-5)
        keep = torch.tensor([[1, 2, 9], [0, 4, 15]])
        assert vit_tokens(enc, x, keep=keep).shape == (2, 5 + 3, 32)


def _ijepa_config(overrides=None):
    return tiny_config("ijepa", overrides)


def test_ijepa_targets_are_layer_normed_target_tokens_and_predictions_cover_them():
    cfg = _ijepa_config()
    torch.manual_seed(0)
    method = build_method(cfg)
    assert method.encoder.num_prefix_tokens == 0 and method.encoder.global_pool == "avg"
    ctx, tgt = multiblock_masks(3, method.grid, 4, min_keep=4, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 3, 28, 28)
    captured = {}
    method.predictor.register_forward_hook(lambda m, i, o: captured.update(args=i, out=o))
    loss, _ = method(Batch([x]), masks=(ctx, tgt))
    context, ctx_in, tgt_in = captured["args"]
    assert torch.equal(ctx_in, ctx) and torch.equal(tgt_in, tgt)
    assert context.shape == (3, ctx.shape[1], 32) and captured["out"].shape == (3, 4, tgt.shape[2], 32)
    with torch.no_grad():
        h = F.layer_norm(method.target_encoder.forward_features(x), (32,))
        target = torch.stack([h[i][tgt[i]] for i in range(3)])
        assert loss.item() == pytest.approx(F.smooth_l1_loss(captured["out"], target).item(), rel=1e-5)
        # the context encoder saw only the context patches: pixels elsewhere do not change its tokens
        outside = torch.ones(3, 49, dtype=torch.bool)
        outside.scatter_(1, ctx, False)
        y = x.clone().view(3, 3, 7, 4, 7, 4)
        for i, j in outside.nonzero().tolist():
            y[i, :, j // 7, :, j % 7, :] += 5.0
        torch.testing.assert_close(vit_tokens(method.encoder, y.view(3, 3, 28, 28), keep=ctx), context)


def test_ijepa_rejects_views_of_another_size():
    cfg = _ijepa_config()
    method = build_method(cfg)
    with pytest.raises(ValueError, match="patch grid"):
        method(Batch([torch.randn(2, 3, 32, 32)]))


def test_dinov2_masks_only_global_crops_and_weights_per_crop():
    """The student's masked global crops go through the mask token; the iBOT loss the method computes equals the
    reference's forward_masked on the same masked patches of its own head outputs."""
    cfg = tiny_config("dinov2")
    torch.manual_seed(0)
    method = build_method(cfg)
    batch = random_batch(cfg, method, b=4)
    masks = torch.zeros(8, 16, dtype=torch.bool)
    masks[1, [0, 1, 4, 5]] = True
    masks[6, [10, 11]] = True
    outs = []
    method.ibot_head.register_forward_hook(lambda m, i, o: outs.append((i[0], o)))
    _, metrics = method(batch, masks=masks)
    (s_in, s_out), = outs
    assert s_in.shape == (6, 32)  # the six masked patches, crop-major, row-major within a crop
    with torch.no_grad():
        t_tokens = method.teacher_encoder.forward_features(torch.cat(batch.views[:2]))[:, 1:]
        t_patch = method.teacher_ibot_head(t_tokens.flatten(0, 1)[masks.flatten()])
        targets = ssl.sinkhorn_knopp(t_patch, method.teacher_temp())
        s_tokens = vit_tokens(method.encoder, torch.cat(batch.views[:2]), mask=masks, mask_token=method.mask_token)
        torch.testing.assert_close(s_in, s_tokens[:, 1:].flatten(0, 1)[masks.flatten()])
    assert metrics["ibot"].item() == pytest.approx(ref_ibot_forward_masked(s_out, targets, masks).item(), rel=1e-5)
    assert {"dino", "koleo", "ibot"} <= metrics.keys()


# ---------------------------------------------------------------------------------------------------------------
# Global terms: 2 gloo ranks == one process on the concatenated batch


def _split(world: int, n: int, sizes: tuple[int, ...]) -> slice:
    """This rank's rows of ``n``: ``sizes`` rows per rank (unequal on purpose) or all of them in one process."""
    import torch.distributed as dist

    if world == 1:
        return slice(0, n)
    rank = dist.get_rank()
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _global_terms(world: int) -> dict:
    g = torch.Generator().manual_seed(0)
    logits, rows = torch.randn(14, 9, generator=g) * 3, torch.randn(14, 5, generator=g)
    feats = torch.randn(16, 6, generator=g)
    pred, target = torch.randn(14, 7, generator=g), torch.randn(14, 7, generator=g)
    uneven = _split(world, 14, (5, 9))
    even = _split(world, 16, (8, 8))
    out = {"sinkhorn": ssl.sinkhorn_knopp(logits[uneven], 0.07).numpy(),
           "row_mean": ssl.global_row_mean(rows[uneven]).numpy()}
    for scope in ("global", "rank"):
        x = feats[even].clone().requires_grad_()
        loss = ssl.koleo_loss(x, global_batch=scope == "global")
        loss.backward()
        out[f"koleo_{scope}"] = (loss.item(), x.grad.numpy())
    z = pred[uneven].clone().requires_grad_()
    loss = ssl.ijepa_loss(z, target[uneven])
    loss.backward()
    out["ijepa"] = (loss.item(), z.grad.numpy())
    return out


def test_global_terms_match_one_process_on_the_concatenated_batch():
    """Sinkhorn-Knopp (5 and 9 rows on the two ranks: iBOT's masked patches differ per rank) gives each rank its rows
    of the single-process result; the row mean is the global one; KoLeo over the global batch has the
    single-process loss (mean over ranks) and gradient (rank gradients / W, as DDP averages), and per-rank KoLeo
    does not; I-JEPA's loss with unequal element counts is the global mean, with the global gradient."""
    single = _global_terms(1)
    ranks = run_ranks(_global_terms, 2)
    np.testing.assert_allclose(np.concatenate([r["sinkhorn"] for r in ranks]), single["sinkhorn"], rtol=1e-5,
                               atol=1e-7)
    for r in ranks:
        np.testing.assert_allclose(r["row_mean"], single["row_mean"], rtol=1e-6, atol=1e-7)
    loss, grad = single["koleo_global"]
    assert np.mean([r["koleo_global"][0] for r in ranks]) == pytest.approx(loss, rel=1e-5)
    np.testing.assert_allclose(np.concatenate([r["koleo_global"][1] for r in ranks]) / 2, grad, rtol=1e-4, atol=1e-7)
    assert abs(np.mean([r["koleo_rank"][0] for r in ranks]) - loss) > 1e-3 * abs(loss)  # per rank: not the same
    loss, grad = single["ijepa"]
    assert np.mean([r["ijepa"][0] for r in ranks]) == pytest.approx(loss, rel=1e-5)
    np.testing.assert_allclose(np.concatenate([r["ijepa"][1] for r in ranks]) / 2, grad, rtol=1e-5, atol=1e-8)


DINOV2_VARIANTS = {
    "sinkhorn_knopp": ["method.dinov2.centering=sinkhorn_knopp"],
    "centering": ["method.dinov2.centering=centering", "method.dino.center_momentum=0.5"],
    "koleo_per_rank": ["method.dinov2.koleo_global_batch=false", "method.dinov2.koleo_weight=1.0"],
}


def _methods_on_rank(world: int) -> dict:
    """DINOv2 (three variants) and I-JEPA on this rank's rows of one fixed global batch of 16 with fixed masks: the
    loss, every parameter gradient, and the centre buffers after the step's update."""
    import torch.distributed as dist

    rank = dist.get_rank() if world > 1 else 0
    rows = slice(rank * 16 // world, (rank + 1) * 16 // world)
    out = {}
    for name, overrides in DINOV2_VARIANTS.items():
        cfg = tiny_config("dinov2", overrides)
        torch.manual_seed(0)
        method = build_method(cfg)
        full = random_batch(cfg, method, b=16)
        masks = ibot_masks(32, (4, 4), (0.1, 0.5), 0.5, rng=np.random.default_rng(0))[0].view(2, 16, 16)
        with torch.no_grad():  # a teacher apart from the student, so that the targets are not the student's own
            for p in method.teacher_encoder.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
        loss, _ = method(Batch([v[rows] for v in full.views]), masks=masks[:, rows].reshape(-1, 16))
        loss.backward()
        out[name] = {"loss": loss.item(),
                     "grads": {n: p.grad.numpy() for n, p in method.named_parameters() if p.grad is not None},
                     "buffers": {n: b.numpy() for n, b in method.named_buffers() if "center" in n}}
    cfg = tiny_config("ijepa")
    torch.manual_seed(0)
    method = build_method(cfg)
    full = random_batch(cfg, method, b=16)
    ctx, tgt = multiblock_masks(16, method.grid, 4, min_keep=4, generator=torch.Generator().manual_seed(0))
    loss, _ = method(Batch([v[rows] for v in full.views]), masks=(ctx[rows], tgt[rows]))
    loss.backward()
    out["ijepa"] = {"loss": loss.item(), "buffers": {},
                    "grads": {n: p.grad.numpy() for n, p in method.named_parameters() if p.grad is not None}}
    return out


def _rel_err(got: np.ndarray, want: np.ndarray, floor: float) -> float:
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), floor))


def test_methods_on_two_ranks_match_one_process():
    """Whole methods, 2 gloo ranks holding 8 images each vs one process holding all 16 (same masks): the mean rank
    loss, the rank-averaged gradient of every parameter (what DDP applies) and the centres after the update are
    the single process's, for DINOv2 with Sinkhorn-Knopp and with centring (both global, KoLeo global), and for
    I-JEPA. With KoLeo per rank (the dinov2 code's choice) they are not, which shows the comparison can fail."""
    single = _methods_on_rank(1)
    ranks = run_ranks(_methods_on_rank, 2)
    for name, ref in single.items():
        got = [r[name] for r in ranks]
        loss_err = abs(np.mean([g["loss"] for g in got]) - ref["loss"]) / abs(ref["loss"])
        floor = 1e-3 * math.sqrt(sum(float(np.sum(w ** 2)) for w in ref["grads"].values()))
        assert got[0]["grads"].keys() == ref["grads"].keys()
        grad_err = max(_rel_err(np.mean([g["grads"][n] for g in got], axis=0), want, floor)
                       for n, want in ref["grads"].items())
        buf_err = max([_rel_err(g["buffers"][n], want, 1e-6) for g in got for n, want in ref["buffers"].items()],
                      default=0.0)
        if name == "koleo_per_rank":
            assert max(loss_err, grad_err) > 1e-3, (name, loss_err, grad_err)
        else:
            assert loss_err < 1e-5 and grad_err < 1e-4 and buf_err < 1e-5, (name, loss_err, grad_err, buf_err)
    assert single["centering"]["buffers"]["center"].any() and single["centering"]["buffers"]["ibot_center"].any()


# ---------------------------------------------------------------------------------------------------------------
# Optimiser groups: layer-wise learning-rate decay, patch-embedding multiplier, both heads' last layers held


def ref_lr_decay_rate(name, lr_decay_rate, num_layers):
    """dinov2 ``get_vit_lr_decay_rate`` for a backbone parameter (force_is_backbone, no chunked blocks)."""
    layer_id = num_layers + 1
    if "pos_embed" in name or "patch_embed" in name or "mask_token" in name or "cls_token" in name:
        layer_id = 0
    elif "blocks." in name and "residual." not in name:
        layer_id = int(name[name.find("blocks."):].split(".")[1]) + 1
    return lr_decay_rate ** (num_layers + 1 - layer_id)


def test_dinov2_param_groups_decay_layerwise_and_hold_both_last_layers():
    from pipeline.distributed import DistEnv
    from pipeline.engines import build_engine

    cfg = tiny_config("dinov2", ["method.dinov2.layerwise_decay=0.5", "method.dinov2.patch_embed_lr_mult=0.2",
                                 "method.dino.freeze_last_layer_steps=2", "optim.warmup_steps=0"])
    torch.manual_seed(0)
    method = build_method(cfg)
    names = {id(p): n for n, p in method.named_parameters()}
    groups = method.param_groups(0.04)
    grouped = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(n for n, p in method.named_parameters() if p.requires_grad)  # each once
    for g in groups:
        for p in g["params"]:
            name = names[id(p)]
            if name.startswith("encoder.") or name == "mask_token":  # the reference's backbone (its mask token too)
                want = ref_lr_decay_rate(name.removeprefix("encoder."), 0.5, 2)
                want *= 0.2 if "patch_embed" in name else 1.0
            else:  # heads: full rate
                want = 1.0
            assert g["lr_scale"] == pytest.approx(want), name
            assert (g.get("frozen_steps", 0) == 2) == (".last_layer." in name), name  # dinov2 ``is_last_layer``
    assert {names[id(p)] for g in groups if g.get("frozen_steps") for p in g["params"]} == {
        f"{head}.last_layer.{w}" for head in ("head", "ibot_head") for w in ("weight", "weight_g")}
    engine = build_engine(cfg, DistEnv(), torch.device("cpu"))
    engine.setup(method, 4)
    for step in range(4):  # the engine's schedule applies each group's factor to the common rate
        lr = engine.scheduler.lrs[step]
        assert engine.lr == pytest.approx(lr)  # what the metrics log: the schedule's rate, not a scaled group's
        for g in engine.optimizer.param_groups:
            held = step < g.get("frozen_steps", 0)
            assert g["lr"] == pytest.approx(0.0 if held else lr * g["lr_scale"]), (step, g["lr_scale"])
        engine.micro_step(random_batch(cfg, method, seed=step), sync=True, scale=1.0)
        engine.step()
        method.after_step(step, 4)


def test_cli_help_lists_dinov2_and_ijepa(capsys):
    from pipeline.cli import METHOD_NAMES, main
    from pipeline.methods import METHODS

    assert list(METHOD_NAMES) == [n for n in METHODS if not n.endswith("_test")]
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "dinov2, ijepa" in " ".join(capsys.readouterr().out.split())

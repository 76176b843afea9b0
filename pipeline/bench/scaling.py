"""``bench scaling``: a model of the step time at N GPUs per node and M nodes, from the compute time measured
on one device and the bytes each step moves; plus a measured 1 vs 2 process comparison on this machine.

The model (weak scaling: the per-device batch B is fixed, the global batch grows with the world size W = N M):

    t_step(W) = t_compute(W) + exposed(gradient/parameter collectives) + t(feature all-gather + its backward)

* **Compute.** ``t_compute(1)`` is measured. The contrastive loss grows with the global batch: NT-Xent over
  the full 2WB x 2WB logit matrix costs 24 (WB)^2 D FLOPs (forward and backward), with a local loss
  (``method.simclr.local_loss``) 24 B (WB) D; the difference to W = 1 runs at the FLOP rate measured.
* **Bytes per rank per step** (ring algorithms, P parameters, S bytes of the full tensor):
  all-reduce 2 (W-1)/W S, reduce-scatter and all-gather (W-1)/W S each.
  DDP: all-reduce of the gradients (fp32). ZeRO-1/2: reduce-scatter of the gradients, all-gather of the updated
  parameters. FSDP2 / ZeRO-3: all-gather of the parameters in forward and again in backward, reduce-scatter of
  the gradients. Contrastive loss: all-gather of the 2 views' features (W B x D, fp32) and the reduce-scatter
  of their gradients in backward: 4 (W-1) B D x 4 bytes.
* **Time of a collective** on N GPUs per node, M nodes (hierarchical, as NCCL does it): the intra-node part
  moves k (N-1)/N S over NVLink at ``intra_node_gbps``, the inter-node part k (M-1)/M S/N per GPU over its
  share of the network at ``inter_node_gbps`` (k = 2 for all-reduce, 1 otherwise), plus a latency per ring
  step. Bandwidths are per GPU and per direction, in GB/s: use nccl-tests' ``busbw`` of your cluster.
* **Overlap.** Gradient and parameter collectives overlap the backward (forward for FSDP's forward
  all-gathers) up to ``overlap`` x that phase's time (1.0: perfect overlap; the forward/backward split comes
  from the counted FLOPs); ZeRO-1/2's parameter all-gather after the optimizer step and the feature gather sit
  on the critical path.

Scaling efficiency = t_step(1) / t_step(W), i.e. images/sec per device at W relative to one device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Interconnect:
    gpus_per_node: int = 8
    intra_node_gbps: float = 450.0
    """GB/s per GPU per direction inside a node (NVLink 4, H100/H200 SXM: 900 GB/s both directions)."""
    inter_node_gbps: float = 50.0
    """GB/s per GPU per direction between nodes (one 400 Gb/s InfiniBand NDR / RoCE NIC per GPU)."""
    intra_latency_us: float = 2.0
    inter_latency_us: float = 5.0


@dataclass
class StepProfile:
    """What the model needs of one measured training step on one device."""

    compute_time_s: float
    """Measured step time at world size 1 (seconds)."""
    forward_fraction: float
    """Forward FLOPs / (forward + backward) FLOPs: how the compute splits into overlap windows."""
    step_flops: float
    """FLOPs of one step on one device (counted), for the FLOP rate of the extra loss compute."""
    num_params: int
    batch_size: int
    feature_tensors: int = 2
    """Feature tensors all-gathered for the loss (SimCLR: the two views' projections; 0: no cross-rank loss)."""
    feature_dim: int = 128
    local_loss: bool = False
    bf16: bool = False
    """Mixed precision: decides the bytes per parameter and gradient each engine communicates."""
    source: str = "measured"


# ---------------------------------------------------------------------------------------------------------------
# Bytes


def all_reduce_bytes(nbytes: float, world: int) -> float:
    """Bytes each rank sends (and receives) in a ring all-reduce of an ``nbytes`` tensor."""
    return 2 * (world - 1) / world * nbytes


def all_gather_bytes(nbytes: float, world: int) -> float:
    """Bytes each rank receives in a ring all-gather whose output is ``nbytes``; a reduce-scatter of an
    ``nbytes`` input moves the same."""
    return (world - 1) / world * nbytes


reduce_scatter_bytes = all_gather_bytes


def comm_dtype_bytes(engine: str, bf16: bool) -> tuple[int, int]:
    """(bytes per parameter, bytes per gradient) on the wire. DDP under autocast keeps fp32 parameters and
    gradients; FSDP2 with a bf16 ``MixedPrecisionPolicy`` gathers bf16 parameters and reduces fp32 gradients;
    DeepSpeed bf16 holds bf16 weights and gradients (the fp32 master copy stays in the optimizer)."""
    if not bf16 or engine == "ddp":
        return 4, 4
    return (2, 4) if engine == "fsdp" else (2, 2)


def collectives(engine: str, zero_stage: int, p: StepProfile, world: int) -> list[dict[str, Any]]:
    """The collectives of one step: kind, full tensor size S (bytes), the phase they may overlap, and the
    bytes each rank moves."""
    param_bytes, grad_bytes = comm_dtype_bytes(engine, p.bf16)
    grads, params = p.num_params * grad_bytes, p.num_params * param_bytes
    out: list[tuple[str, str, float, str]] = []
    if engine == "ddp" or (engine == "deepspeed" and zero_stage == 0):
        out.append(("gradients", "all_reduce", grads, "backward"))
    elif engine == "deepspeed" and zero_stage in (1, 2):
        out += [("gradients", "reduce_scatter", grads, "backward"), ("parameters", "all_gather", params, "none")]
    elif engine in ("fsdp", "deepspeed"):  # FSDP2 (fully_shard) and ZeRO-3
        out += [("parameters (forward)", "all_gather", params, "forward"),
                ("parameters (backward)", "all_gather", params, "backward"),
                ("gradients", "reduce_scatter", grads, "backward")]
    else:
        raise ValueError(f"unknown engine {engine!r}")
    if p.feature_tensors:
        feats = p.feature_tensors * world * p.batch_size * p.feature_dim * 4  # fp32 (normalised in fp32)
        out += [("features", "all_gather", feats, "none"), ("feature gradients", "reduce_scatter", feats, "none")]
    rows = []
    for what, kind, size, phase in out:
        moved = all_reduce_bytes(size, world) if kind == "all_reduce" else all_gather_bytes(size, world)
        rows.append({"what": what, "kind": kind, "tensor_bytes": size, "bytes_per_rank": moved, "overlaps": phase})
    return rows


def feature_gather_bytes(batch_size: int, feature_dim: int, world: int, tensors: int = 2, dtype_bytes: int = 4) -> float:
    """Bytes each rank moves per step for the contrastive loss: all-gather of the features and reduce-scatter
    of their gradients: 2 x tensors x (W-1) x B x D x bytes."""
    return 2 * tensors * (world - 1) * batch_size * feature_dim * dtype_bytes


# ---------------------------------------------------------------------------------------------------------------
# Time


def collective_time(kind: str, nbytes: float, gpus_per_node: int, nodes: int, ic: Interconnect) -> float:
    n, m = gpus_per_node, nodes
    if n * m == 1:
        return 0.0
    k = 2 if kind == "all_reduce" else 1
    intra = k * (n - 1) / n * nbytes / (ic.intra_node_gbps * 1e9)
    inter = k * (m - 1) / m * nbytes / n / (ic.inter_node_gbps * 1e9)
    latency = k * ((n - 1) * ic.intra_latency_us + (m - 1) * ic.inter_latency_us) * 1e-6
    return intra + inter + latency


def loss_flops(batch_size: int, world: int, dim: int, local_loss: bool) -> float:
    """NT-Xent logits and their gradients: 3 x 2 x queries x keys x D with 2WB keys."""
    n = world * batch_size
    queries = 2 * batch_size if local_loss else 2 * n
    return 6.0 * queries * (2 * n) * dim


def predict(p: StepProfile, engine: str, zero_stage: int, gpus_per_node: int, nodes: int, ic: Interconnect,
            overlap: float = 1.0) -> dict[str, Any]:
    world = gpus_per_node * nodes
    rate = p.step_flops / p.compute_time_s
    extra = 0.0
    if p.feature_tensors:
        extra = (loss_flops(p.batch_size, world, p.feature_dim, p.local_loss)
                 - loss_flops(p.batch_size, 1, p.feature_dim, p.local_loss)) / rate
    compute = p.compute_time_s + extra
    t_fwd, t_bwd = compute * p.forward_fraction, compute * (1 - p.forward_fraction)
    comms = collectives(engine, zero_stage, p, world)
    by_phase = {"forward": 0.0, "backward": 0.0, "none": 0.0}
    for c in comms:
        c["time_s"] = collective_time(c["kind"], c["tensor_bytes"], gpus_per_node, nodes, ic)
        by_phase[c["overlaps"]] += c["time_s"]
    exposed = (max(0.0, by_phase["forward"] - overlap * t_fwd) + max(0.0, by_phase["backward"] - overlap * t_bwd)
               + by_phase["none"])
    step = compute + exposed
    n_keys = 2 * world * p.batch_size
    n_queries = 2 * p.batch_size if p.local_loss else n_keys
    return {
        "engine": engine if engine != "deepspeed" else f"zero{zero_stage}", "local_loss": p.local_loss,
        "gpus_per_node": gpus_per_node, "nodes": nodes, "world_size": world,
        "global_batch": world * p.batch_size,
        "compute_time_s": compute, "loss_extra_compute_s": extra,
        "comm_time_s": sum(by_phase.values()), "exposed_comm_s": exposed,
        "step_time_s": step, "images_per_sec_per_device": p.batch_size / step,
        "bytes_per_rank": sum(c["bytes_per_rank"] for c in comms),
        "loss_logits_gib": n_queries * n_keys * 4 / 2**30 if p.feature_tensors else 0.0,
        "collectives": comms,
    }


def predict_table(p: StepProfile, scenarios: list[tuple[str, int, bool]], nodes: list[int], ic: Interconnect,
                  overlap: float = 1.0) -> list[dict[str, Any]]:
    """Predictions for every (engine, zero stage, local loss) scenario at 1 GPU and at ``nodes`` x N GPUs,
    with the efficiency relative to one GPU."""
    rows = []
    for engine, stage, local in scenarios:
        prof = StepProfile(**{**asdict(p), "local_loss": local})
        one = predict(prof, engine, stage, 1, 1, ic, overlap)
        for gpn, m in [(1, 1)] + [(ic.gpus_per_node, m) for m in nodes]:
            r = predict(prof, engine, stage, gpn, m, ic, overlap)
            r["scaling_efficiency"] = one["step_time_s"] / r["step_time_s"]
            rows.append(r)
    return rows

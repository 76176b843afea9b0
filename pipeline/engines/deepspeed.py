"""DeepSpeed ZeRO-1/2/3 engine: DeepSpeed owns backward, gradient accumulation, clipping, the optimizer and
schedule step, and the checkpoint files; we hand it our optimizer (``torch.optim.AdamW``, no extension to
compile) and our schedule, and a ds_config generated from our config.

On CPU, ``DS_ACCELERATOR=cpu`` is set before DeepSpeed is imported and collectives go over gloo. The first
process group DeepSpeed wraps on a machine compiles its ``deepspeed_shm_comm`` extension (~35 s); it is cached
under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) for every later run.

EMA teachers: ZeRO-1/2 partition only optimizer state (and gradients), so every rank holds full teacher and
student parameters and ``ema_update`` lerps them whole. ZeRO-3 partitions every module parameter, frozen ones
included, the same way for the same shape: ``ema_update`` lerps the teacher's ``ds_tensor`` partitions toward
the student's (and the gathered copies of "persistent" small parameters), so teachers are sharded alongside.
Checkpoints keep frozen parameters (``exclude_frozen_parameters=False``) and zero_to_fp32 restores them. In bf16
runs DeepSpeed casts every parameter to bf16; frozen ones are put back in fp32 (``_restore_fp32``: a bf16 EMA
barely moves), and ``method_state_dict`` exports the fp32 masters rather than their bf16 rounding.

Loading: DeepSpeed's files are its own pickles, and DeepSpeed reads them with ``torch.load(weights_only=False)``
(its checkpoint engine, and zero_to_fp32). Before DeepSpeed sees a checkpoint, each of its files is loaded
weights-only once (memory-mapped: the pickled structure, not the tensor data) with only the few DeepSpeed classes
its files hold allow-listed (:func:`checkpoint_globals`), and a file needing anything else is refused, by name, on
every rank; DeepSpeed's own load then runs under ``pipeline.checkpoint.weights_only_loads``, which makes each of
its ``torch.load`` calls weights-only with the same allow-list (a file swapped after the check is refused too).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline.checkpoint import (
    UntrustedFileError,
    first_refused,
    load_trusted,
    raise_if_refused_anywhere,
    refusal_reason,
    weights_only_loads,
)
from pipeline.config import ConfigError
from pipeline.data.loader import Batch
from pipeline.distributed import DistEnv
from pipeline.engines.base import Engine
from pipeline.methods.base import Method

TAG = "ds"
"""DeepSpeed checkpoint tag: files go to ``<checkpoint>/ds/``."""


def _import_deepspeed(device_type: str):
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed


def checkpoint_globals() -> list:
    """What DeepSpeed's checkpoint files hold besides tensors and plain containers (its optimizer state's loss
    scaler, ZeRO stage and fp32 fragment addresses, found with ``torch.serialization.get_unsafe_globals_in_checkpoint``
    on ZeRO-1/2/3 files, fp32 and bf16): plain classes, a dataclass and an int enum, whose rebuilding runs no code
    of the file's choosing."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def _trusted_files(folder: Path, env: DistEnv | None = None) -> Iterator[list]:
    """DeepSpeed's loads in this block are weights-only (see the module docstring). Its files are checked first,
    each once: with ``env``, split across the ranks and refused on every rank together (ranks load different
    files under ZeRO-3); without, in this process alone. Yields the allow-list."""
    allow = checkpoint_globals()
    files = sorted(folder.glob("*.pt"))
    if env is None:
        refused = first_refused(files, allow)
        if refused is not None:
            raise refused
    else:
        raise_if_refused_anywhere(first_refused(files[env.rank::env.world_size], allow))
    try:
        with weights_only_loads(allow):
            yield allow
    except pickle.UnpicklingError as exc:  # a file changed since the check, or one the check did not see
        if isinstance(exc, UntrustedFileError):
            raise
        raise UntrustedFileError(folder, refusal_reason(exc)) from None


def ds_config(cfg, world_size: int, bf16: bool) -> dict[str, Any]:
    """The ds_config DeepSpeed runs with, derived from our config tree (never written by hand)."""
    e, o = cfg.engine, cfg.optim
    zero: dict[str, Any] = {"stage": e.zero_stage}
    if e.offload != "none":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if e.offload == "params":
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.loader.batch_size,
        "gradient_accumulation_steps": o.accumulation_steps,
        "train_batch_size": cfg.loader.batch_size * o.accumulation_steps * world_size,
        # DeepSpeed clips at 1.0 unless told otherwise: always say what we mean (0 disables).
        "gradient_clipping": float(o.clip_grad_norm),
        "zero_optimization": zero,
        "bf16": {"enabled": bf16, "check_grad_overflow": cfg.train.nan_policy == "skip"},
        "zero_allow_untested_optimizer": True,  # our torch.optim.AdamW
        "zero_force_ds_cpu_optimizer": False,  # ... also under ZeRO-Offload
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if bf16:
        config["communication_data_type"] = "bf16" if e.reduce_dtype == "bf16" else "fp32"
    return _merge(config, e.ds_config)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _init_single_process_group(device: torch.device) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)


def _forget_stale_groups() -> None:
    """DeepSpeed caches the process groups it derives from the world group in module globals. When a process
    trains twice (tests, notebooks, Ray workers) and the first group was destroyed with torch's
    ``destroy_process_group``, the cache points at a dead group: drop it so DeepSpeed derives fresh ones."""
    from deepspeed.utils import groups

    cached = groups._WORLD_GROUP
    if cached is None:
        return
    try:
        dist.get_process_group_ranks(cached)
    except (KeyError, ValueError, RuntimeError):
        groups._release_process_group_references(group=None)


def _restore_fp32(frozen: dict[torch.nn.Parameter, torch.Tensor], rank: int) -> None:
    """Put frozen parameters (EMA teachers) back in fp32 after DeepSpeed cast every parameter to bf16.

    No optimizer keeps an fp32 master of a frozen parameter, and a bf16 EMA cannot move: an update of
    (1 - momentum) x (student - teacher) is mostly below half a bf16 ulp of the teacher (0.2%), so the teacher
    would stay close to its initial copy. Autocast casts the fp32 weights for the teacher's forward. Under ZeRO-3
    each rank's partition is its slice of the flattened parameter, zero-padded at the end (and "persistent"
    parameters also hold the whole tensor); DeepSpeed gathers each partition in its own dtype."""
    for p, full in frozen.items():
        if hasattr(p, "ds_tensor"):
            n = p.ds_tensor.numel()
            part = full.flatten()[rank * n:(rank + 1) * n]
            p.ds_tensor.data = torch.cat([part, part.new_zeros(n - part.numel())])
            if p.data.numel():
                p.data = full
        else:
            p.data = full


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, cfg, env: DistEnv, device: torch.device) -> None:
        super().__init__(cfg, env, device)
        if cfg.train.nan_policy == "skip" and self.dtype is None:
            raise ConfigError("train.nan_policy=skip with engine.name=deepspeed needs bf16 (DeepSpeed's "
                              "check_grad_overflow): in fp32 DeepSpeed's step cannot skip an update")
        if cfg.optim.clip_grad_mode != "global" and cfg.optim.clip_grad_norm > 0:
            raise ConfigError(f"optim.clip_grad_mode={cfg.optim.clip_grad_mode} with engine.name=deepspeed: "
                              "DeepSpeed clips the global gradient norm inside its step; set "
                              "optim.clip_grad_mode=global")
        self.ds = None
        self._skipped = 0

    def _wrap(self, method: Method, total_steps: int) -> None:
        deepspeed = _import_deepspeed(self.device.type)
        if not dist.is_initialized():
            # One process: DeepSpeed still wants a process group. train() destroys it at the end, as it does
            # any group that did not exist when it started.
            _init_single_process_group(self.device)
        _forget_stale_groups()
        # DeepSpeed asserts LOCAL_RANK is set, which only torchrun-style launchers do: one in-process run, or a
        # Slurm/Ray rank whose position came from another environment, passes its own.
        os.environ.setdefault("LOCAL_RANK", str(self.env.local_rank))
        method.to(self.device)
        if self.cfg.model.grad_checkpointing and hasattr(method.encoder, "set_grad_checkpointing"):
            method.encoder.set_grad_checkpointing(True)
        if self.cfg.engine.compile:
            for block in method.blocks():
                block.compile()
        self.build_optimizer(method, total_steps)
        world = dist.get_world_size()
        frozen = {p: p.detach().clone() for p in method.parameters() if not p.requires_grad} if self.dtype else {}
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=method, optimizer=self.optimizer, lr_scheduler=self.scheduler,
            config=ds_config(self.cfg, world, bf16=self.dtype is not None), dist_init_required=False,
        )
        _restore_fp32(frozen, dist.get_rank())
        self.model = self.ds

    # -- one step ---------------------------------------------------------------------------------------------
    def micro_step(self, batch: Batch, sync: bool, scale: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """DeepSpeed divides the loss by ``gradient_accumulation_steps`` itself (= 1/``scale``) and reduces
        gradients only on the accumulation boundary, which it tracks by counting ``step()`` calls: off the
        boundary, ``step()`` only advances that count."""
        if self.dtype is not None:  # bf16 parameters: feed bf16 images
            batch = dataclasses.replace(batch, views=[v.to(self.dtype) for v in batch.views])
        with self.autocast():
            loss, metrics = self.ds(batch)
        self.ds.backward(loss)
        if not sync:
            self.ds.step()
        return loss.detach().float(), metrics

    def step(self, skip_nonfinite: bool = False) -> torch.Tensor | None:
        """The optimizer step: clipping, AdamW, schedule and zeroing, all inside DeepSpeed's ``step``.
        Returns DeepSpeed's pre-clip global gradient norm, or None for a step DeepSpeed skipped (bf16
        ``check_grad_overflow``, enabled by ``train.nan_policy=skip``)."""
        self.ds.step()
        skipped = self.ds.skipped_steps
        if skip_nonfinite and skipped > self._skipped:
            self._skipped = skipped
            return None
        norm = self.ds.get_global_grad_norm()
        return torch.as_tensor(0.0 if norm is None else norm, dtype=torch.float32)

    def zero_grad(self) -> None:
        self.ds.zero_grad()

    def resident_tensors(self) -> dict[str, list[torch.Tensor]]:
        """DeepSpeed's own kinds (the buffers its ``offload_states`` moves): the model-dtype parameters (ZeRO-1/2:
        one flat buffer the module's parameters view; ZeRO-3: this rank's partitions plus the small "persistent"
        parameters kept gathered), the fp32 master partitions the wrapped AdamW steps (``master``: a copy
        even in fp32 runs), the reduced gradient partitions, AdamW's state, and ZeRO-3's reduce buckets."""
        held = super().resident_tensors()
        zero = self.optimizer
        if self.ds.zero_optimization_stage() == 3:
            grads = [zero.grad_partitions_flat_buffer]
            held["buckets"] = [b.buffer for b in zero.ipg_buckets.values() if torch.is_tensor(b.buffer)]
        else:
            grads = [g for gs in zero.averaged_gradients.values() if gs is not None for g in gs if g is not None]
        # what AdamW steps: its state's keys (ZeRO-3 lends it each partition only during the step)
        held["master"] = list(zero.optimizer.state) + [p for g in zero.optimizer.param_groups for p in g["params"]]
        held["grads"] += grads + [p.grad for p in held["master"] if p.grad is not None]
        held["optim"] = [v for s in zero.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        return held

    # -- state ------------------------------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        self.ds.save_checkpoint(str(path), tag=TAG, save_latest=False)

    def load(self, path: Path) -> None:
        with _trusted_files(path / TAG, self.env):
            load_path, _ = self.ds.load_checkpoint(str(path), tag=TAG, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {path / TAG}")
        self._skipped = self.ds.skipped_steps

    def method_state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.cfg.engine.zero_stage == 3:
            # Gathers one module at a time onto rank 0 (what the engine's own model computes with).
            sd = self.ds._zero3_consolidated_16bit_state_dict()
        else:
            sd = {k: v.detach().to("cpu", copy=True) for k, v in self.method.state_dict().items()}
        if self.dtype is not None:
            # bf16 runs: the trained weights are the fp32 masters (what zero_to_fp32 and the other engines
            # export), not their bf16 rounding the module computes with. Collective, one parameter at a time.
            from deepspeed.utils import safe_get_full_fp32_param

            for name, p in self.method.named_parameters():
                if p.requires_grad:
                    full = safe_get_full_fp32_param(p)
                    if self.env.is_main:
                        sd[name] = full.detach().to("cpu", copy=True)
        return sd if self.env.is_main else None

    @classmethod
    def read_model_state(cls, path: Path, method: Method) -> dict[str, torch.Tensor]:
        """The zero_to_fp32 consolidation: fp32 master weights (frozen teacher parameters included) from every
        rank's partition files, in this process alone."""
        _import_deepspeed("cpu")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with _trusted_files(path / TAG) as allow:
            sd = dict(get_fp32_state_dict_from_zero_checkpoint(str(path), tag=TAG))
        expected = method.state_dict()
        missing = set(expected) - set(sd)
        module_file = path / TAG / "mp_rank_00_model_states.pt"
        if missing and module_file.is_file():
            # ZeRO-1 records no frozen parameters for zero_to_fp32 (ZeRO-2/3 do), but being unpartitioned they
            # are whole in the module state rank 0 saved.
            module = load_trusted(module_file, allow, map_location="cpu")["module"]
            for k in missing & set(module):
                if module[k].shape == expected[k].shape:
                    sd[k] = module[k]
        missing = sorted(set(expected) - set(sd))
        if missing:
            raise KeyError(f"{path}: the consolidated DeepSpeed state lacks {missing[:5]} ({len(missing)} in all)")
        return {k: sd[k] for k in expected}

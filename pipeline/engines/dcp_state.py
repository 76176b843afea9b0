"""State handling shared by the engines whose state is torch's own (DDP, FSDP2): torch.distributed.checkpoint.

``get_state_dict`` gives the model and optimizer state keyed by parameter FQN whatever the wrapping (plain
tensors under DDP, ``DTensor`` shards under FSDP2), and ``dcp.save`` writes each rank's part once. The files
hold global shapes and offsets, so ``dcp.load`` reshards: a checkpoint written by W ranks resumes on any number
of ranks, and ``read_model_state`` reads it in one process without a process group (export).

DCP's own reader unpickles the folder's ``.metadata`` with plain ``pickle.load`` and its non-tensor entries (the
optimizer's hyper-parameters) with ``torch.load(weights_only=False)``: either would run code planted in a copied run
directory. Every DCP load here goes through :class:`TrustedReader`, which reads the metadata with an unpickler that
resolves only the classes DCP's metadata is made of, and reads the data with every ``torch.load`` weights-only.
"""

from __future__ import annotations

import pathlib
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    _MEM_FORMAT_ENCODING,
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from pipeline.checkpoint import UntrustedFileError, load_trusted, refusal_reason, weights_only_loads
from pipeline.engines.base import Engine
from pipeline.methods.base import Method

_METADATA_GLOBALS: dict[tuple[str, str], Any] = {
    (g.__module__, g.__qualname__): g
    for g in (Metadata, TensorStorageMetadata, BytesStorageMetadata, ChunkStorageMetadata, TensorProperties,
              MetadataIndex, StorageMeta, _MEM_FORMAT_ENCODING, _StorageInfo, torch.serialization._get_layout,
              pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath)
} | {("torch", "Size"): torch.Size}
"""Everything a DCP ``.metadata`` pickle names (torch 2.11-2.14): its dataclasses and enum, tensor sizes, dtypes
(below), layouts (``_get_layout`` looks a name up among torch's layouts) and the checkpoint path. Building any of
them runs no code chosen by the file."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _METADATA_GLOBALS:
            return _METADATA_GLOBALS[(module, name)]
        raise pickle.UnpicklingError(f"it names {module}.{name}, which DCP metadata never holds")


def _is_file_name(name: Any) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name and "\\" not in name


class TrustedReader(FileSystemReader):
    """DCP's file system reader, minus its two ways of running code from the folder (see the module docstring).
    Remembers the first file it refused in ``refused``: DCP turns a failed metadata read into an assertion message
    (after trying rank-local metadata instead), which :func:`trusted_dcp_load` replaces with the refusal."""

    refused: UntrustedFileError | None = None

    def _refuse(self, path: Any, detail: str) -> UntrustedFileError:
        if self.refused is None:
            self.refused = UntrustedFileError(path, detail)
        return self.refused

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        path = Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata")
        with open(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except pickle.UnpicklingError as exc:
                raise self._refuse(path, str(exc)) from None
            except Exception as exc:  # noqa: BLE001 (truncated or garbled: say which file)
                raise ValueError(f"{path}: not a readable DCP metadata file ({exc!r})") from None
        infos = (metadata.storage_data or {}).values() if isinstance(metadata, Metadata) else [None]
        if not all(isinstance(i, _StorageInfo) and _is_file_name(i.relative_path) for i in infos):
            raise self._refuse(path, "not the metadata of a DCP folder, or it names files outside it")
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: Any, planner: Any) -> Any:
        try:
            with weights_only_loads():  # DCP's planner loads non-tensor entries with weights_only=False
                return super().read_data(plan, planner)
        except pickle.UnpicklingError as exc:
            files = sorted({self.storage_data[i.storage_index].relative_path for i in plan.items})
            where = Path(self.path) / files[0] if len(files) == 1 else f"{self.path}/{{{','.join(files)}}}"
            raise self._refuse(where, refusal_reason(exc)) from None


def trusted_dcp_load(state: dict, folder: Path, **kwargs: Any) -> None:
    """``dcp.load`` through :class:`TrustedReader`. A refused file raises :class:`UntrustedFileError` on every rank:
    the ranks that refused it, and the others, which get it among the failures DCP gathers from every rank."""
    reader = TrustedReader(folder)
    try:
        dcp.load(state, storage_reader=reader, **kwargs)
    except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
        failures = exc.failures.values() if isinstance(exc, CheckpointException) else []
        refused = reader.refused or next((e for e, _ in failures if isinstance(e, UntrustedFileError)), None)
        if refused is None:
            raise
        raise refused from None
    if reader.refused is not None:  # DCP went on with rank-local metadata after refusing the folder's own
        raise reader.refused


class DCPStateEngine(Engine):
    def _state(self) -> dict:
        model_sd, optim_sd = get_state_dict(self.method, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def save(self, path: Path) -> None:
        dcp.save(self._state(), checkpoint_id=str(path / "dcp"))
        if self.env.is_main:
            torch.save({"scheduler": self.scheduler.state_dict()}, path / "engine.pt")

    def load(self, path: Path) -> None:
        state = self._state()
        trusted_dcp_load(state, path / "dcp")
        set_state_dict(self.method, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.scheduler.load_state_dict(load_trusted(path / "engine.pt")["scheduler"])

    def method_state_dict(self) -> dict[str, torch.Tensor] | None:
        sd = get_model_state_dict(self.method, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if self.env.is_main else None

    @classmethod
    def read_model_state(cls, path: Path, method: Method) -> dict[str, torch.Tensor]:
        state = {"model": method.state_dict()}
        trusted_dcp_load(state, path / "dcp", no_dist=True)  # this process alone, group or not
        return state["model"]

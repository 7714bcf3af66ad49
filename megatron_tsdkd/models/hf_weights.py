"""Read Hugging Face safetensors (one file or a sharded index) straight into this rank's TP/PP shard.

Each rank opens only the files holding tensors its stage needs and reads only its slices
(``safe_open(...).get_slice``), so a 72B teacher is never read whole by every rank. Before any read, the files are
checked by hand against the safetensors format (8-byte header length, JSON header, data length) because a
truncated file otherwise fails deep inside the reader with a message that names no file.
"""
from __future__ import annotations

import json
import os
import struct
from contextlib import ExitStack
from typing import Iterable, Optional

import torch

from megatron_tsdkd.models.errors import WeightFileError
from megatron_tsdkd.models.hf_config import arch_spec, read_hf_config
from megatron_tsdkd.models.mapping import Piece, hf_tensor_shapes, model_layouts

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_safetensors_header(path: str) -> dict:
    """The tensor table of a safetensors file, after checking that the file is as long as its header says."""
    if not os.path.isfile(path):
        raise WeightFileError(f"weight file {path} is missing")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightFileError(f"weight file {path} is truncated ({size} bytes, shorter than a safetensors header)")
        (header_len,) = struct.unpack("<Q", head)
        if 8 + header_len > size:
            raise WeightFileError(f"weight file {path} is truncated or not safetensors (header of {header_len} "
                                  f"bytes, file of {size})")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise WeightFileError(f"weight file {path} is not a safetensors file (unreadable header)") from None
    header.pop("__metadata__", None)
    data_len = max((t["data_offsets"][1] for t in header.values()), default=0)
    if size != 8 + header_len + data_len:
        raise WeightFileError(f"weight file {path} is truncated or altered: {size} bytes, its header describes "
                              f"{8 + header_len + data_len}")
    return header


class HFWeightFiles:
    """Which file holds which tensor in a Hugging Face folder, with shapes from the headers (read lazily)."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        index = os.path.join(hf_dir, INDEX_FILE)
        if os.path.isfile(index):
            with open(index) as f:
                self.weight_map: Optional[dict[str, str]] = json.load(f)["weight_map"]
        elif os.path.isfile(os.path.join(hf_dir, SINGLE_FILE)):
            self.weight_map = None
        else:
            raise WeightFileError(f"{hf_dir} has neither {SINGLE_FILE} nor {INDEX_FILE} (only safetensors weights "
                                  f"are supported)")
        self._headers: dict[str, dict] = {}

    def file_of(self, hf_name: str) -> str:
        if self.weight_map is None:
            return SINGLE_FILE
        if hf_name not in self.weight_map:
            raise WeightFileError(f"tensor {hf_name} is not listed in {os.path.join(self.hf_dir, INDEX_FILE)}")
        return self.weight_map[hf_name]

    def header(self, filename: str) -> dict:
        if filename not in self._headers:
            self._headers[filename] = read_safetensors_header(os.path.join(self.hf_dir, filename))
        return self._headers[filename]

    def check(self, expected_shapes: dict[str, tuple[int, ...]], names: Iterable[str]) -> None:
        """Every tensor in ``names`` exists in an intact file with the shape the config implies."""
        for hf_name in sorted(set(names)):
            filename = self.file_of(hf_name)
            entry = self.header(filename).get(hf_name)
            if entry is None:
                raise WeightFileError(f"tensor {hf_name} is missing from {os.path.join(self.hf_dir, filename)}")
            found, expected = tuple(entry["shape"]), tuple(expected_shapes[hf_name])
            if found != expected:
                raise WeightFileError(f"tensor {hf_name} in {filename} has shape {list(found)} but the config implies "
                                      f"{list(expected)}")

    def dtype(self) -> str:
        """The safetensors dtype string of the first tensor (e.g. 'BF16', 'F32')."""
        first = self.file_of(next(iter(self.weight_map))) if self.weight_map else SINGLE_FILE
        return next(iter(self.header(first).values()))["dtype"]


def check_hf_weights(hf_dir: str, hf_config) -> None:
    """Check every weight file and tensor shape of a HF folder without reading tensor data (for early errors)."""
    spec = arch_spec(hf_config)
    shapes = hf_tensor_shapes(spec)
    HFWeightFiles(hf_dir).check(shapes, shapes)


def load_hf_weights(model, hf_dir: str, hf_config=None) -> None:
    """Fill this rank's stage/shard of ``model`` from ``hf_dir``; padded vocabulary rows become zero."""
    spec = arch_spec(hf_config if hf_config is not None else read_hf_config(hf_dir))
    layouts = model_layouts(model, spec)
    files = HFWeightFiles(hf_dir)
    files.check(hf_tensor_shapes(spec), (p.hf_name for layout in layouts for p in layout.pieces))
    params = dict(model.named_parameters())
    unmapped = set(params) - {layout.mcore_name for layout in layouts}
    if unmapped:
        raise WeightFileError(f"model parameters {sorted(unmapped)} have no Hugging Face mapping; was the model "
                              f"built from this config?")
    with ExitStack() as stack, torch.no_grad():
        from safetensors import safe_open

        handles: dict = {}

        def read(piece: Piece) -> torch.Tensor:
            filename = files.file_of(piece.hf_name)
            if filename not in handles:
                handles[filename] = stack.enter_context(
                    safe_open(os.path.join(hf_dir, filename), framework="pt", device="cpu"))
            return handles[filename].get_slice(piece.hf_name)[piece.index()]

        for layout in layouts:
            param = params[layout.mcore_name]
            if tuple(param.shape) != layout.shard_shape:
                raise WeightFileError(f"model parameter {layout.mcore_name} has shape {list(param.shape)} but "
                                      f"{hf_dir} maps to {list(layout.shard_shape)}; was the model built from its "
                                      f"config?")
            param.copy_(layout.assemble(read, param.dtype))

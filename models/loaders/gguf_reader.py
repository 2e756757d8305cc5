"""A lean GGUF parser: metadata and tensor views over a memory map, in milliseconds.

`gguf.GGUFReader` builds a numpy view for every element of every metadata array, which takes
seconds for a 49k-token vocabulary and more for Llama 3's 128k (plus 280k merges). We need
scalars and strings only, so string arrays are skipped (their length is kept) and tensors are
exposed as the same raw views GGUFReader gives, ready for `gguf.quants.dequantize`.
Little-endian GGUF v2/v3 only (what llama.cpp writes on every common platform).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class StringArray:
    """A metadata array of strings, not decoded (only its length is needed here)."""

    count: int

    def __len__(self) -> int:
        return self.count


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # ggml order: fastest-varying dim first
    data: np.ndarray  # typed view for float/int types, uint8 blocks [rows, row_bytes] for quantized ones


class GGUFFile:
    def __init__(self, path: str):
        import gguf

        self.path = path
        self._buf = np.memmap(path, mode="r")
        if bytes(self._buf[:4]) != GGUF_MAGIC:
            raise ValueError("GGUF magic missing")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", self._buf, 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (big-endian or too old)")
        self._offset = 4 + 4 + 8 + 8
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._read_string()
            (value_type,) = self._unpack("<I")
            self.metadata[key] = self._read_value(value_type)
        infos = []
        for _ in range(n_tensors):
            name = self._read_string()
            (n_dims,) = self._unpack("<I")
            dims = self._unpack(f"<{n_dims}Q")
            ggml_type, rel_offset = self._unpack("<IQ")
            infos.append((name, tuple(int(d) for d in dims), gguf.GGMLQuantizationType(ggml_type), rel_offset))
        alignment = int(self.metadata.get("general.alignment", 32))
        data_start = -(-self._offset // alignment) * alignment
        self.tensors = [self._tensor(name, dims, qtype, data_start + rel) for name, dims, qtype, rel in infos]

    def _unpack(self, fmt: str) -> tuple[Any, ...]:
        values = struct.unpack_from(fmt, self._buf, self._offset)
        self._offset += struct.calcsize(fmt)
        return values

    def _read_string(self) -> str:
        (length,) = self._unpack("<Q")
        start = self._offset
        self._offset += length
        return bytes(self._buf[start:self._offset]).decode("utf-8")

    def _read_value(self, value_type: int) -> Any:
        if value_type == _STRING:
            return self._read_string()
        if value_type != _ARRAY:
            return self._unpack(_SCALAR[value_type])[0]
        item_type, count = self._unpack("<IQ")
        if item_type == _STRING:
            for _ in range(count):  # skip: length-prefixed, so we only hop over them
                (length,) = struct.unpack_from("<Q", self._buf, self._offset)
                self._offset += 8 + length
            return StringArray(count)
        if item_type == _ARRAY:
            return [self._read_value(_ARRAY) for _ in range(count)]
        dtype = np.dtype(_NUMPY[item_type]).newbyteorder("<")
        values = np.frombuffer(self._buf, dtype=dtype, count=count, offset=self._offset)
        self._offset += values.nbytes
        return values

    def _tensor(self, name: str, dims: tuple[int, ...], qtype: Any, offset: int) -> GGUFTensor:
        import gguf

        Q = gguf.GGMLQuantizationType
        np_shape = tuple(reversed(dims))  # numpy order: [rows, cols]
        n_elements = int(np.prod(dims))
        typed = {Q.F32: np.float32, Q.F16: np.float16, Q.F64: np.float64, Q.I8: np.int8, Q.I16: np.int16,
                 Q.I32: np.int32, Q.I64: np.int64}
        if qtype in typed:
            data = np.frombuffer(self._buf, dtype=typed[qtype], count=n_elements, offset=offset).reshape(np_shape)
        else:
            block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
            n_bytes = n_elements // block_size * type_size
            data = np.frombuffer(self._buf, dtype=np.uint8, count=n_bytes, offset=offset)
            data = data.reshape(gguf.quant_shape_to_byte_shape(np_shape, qtype))
        return GGUFTensor(name=name, tensor_type=qtype, shape=dims, data=data)

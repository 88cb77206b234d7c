"""Reading and writing safetensors files with numpy memory maps (bfloat16 included).

Reading maps the file and hands out views, so a converter can place one slice of one tensor
on one device without ever holding the whole checkpoint in memory.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from humpback_jax.errors import DataError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def read_header(path: Path) -> tuple[dict, int]:
  """The JSON header of a safetensors file and the byte offset where tensor data starts."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise DataError(f"{path}: not a safetensors file (shorter than 8 bytes)", path=path)
    (n,) = struct.unpack("<Q", raw)
    if 8 + n > size:
      raise DataError(f"{path}: the header claims {n} bytes at offset 8, past the end of the file ({size} bytes); "
                      "the file is truncated or not safetensors", path=path)
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise DataError(f"{path}: safetensors header is not valid JSON ({e})", path=path) from e
  if not isinstance(header, dict):
    raise DataError(f"{path}: safetensors header is not a JSON object", path=path)
  header.pop("__metadata__", None)
  return header, 8 + n


def open_tensors(path: Path) -> dict[str, np.ndarray]:
  """Memory-mapped, read-only views of every tensor in one safetensors file, by name; each tensor's
  entry is checked (dtype, shape vs byte range, range inside the file) before it is mapped."""
  header, start = read_header(path)
  size = os.path.getsize(path)
  out = {}
  for name, info in header.items():
    dtype, shape, (begin, end) = _entry(path, name, info)
    if start + end > size:
      raise DataError(f"{path}: tensor {name!r} needs bytes {start + begin}..{start + end} but the file ends at "
                      f"{size}; the file is truncated", path=path, field=name)
    count = (end - begin) // dtype.itemsize
    arr = np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=(count,)) if count else np.zeros(0, dtype)
    out[name] = arr.reshape(shape)
  return out


def _entry(path, name, info) -> tuple[np.dtype, tuple[int, ...], tuple[int, int]]:
  """(dtype, shape, data_offsets) of one header entry, or DataError naming the tensor."""
  try:
    code, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
  except (KeyError, TypeError, ValueError):
    raise DataError(f"{path}: tensor {name!r} has a malformed header entry {info!r}", path=path, field=name) from None
  if code not in _DTYPES:
    raise DataError(f"{path}: tensor {name!r} has unsupported dtype {code}", path=path, field=name)
  dtype = np.dtype(_DTYPES[code])
  if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end
          and end - begin == int(np.prod(shape)) * dtype.itemsize):
    raise DataError(f"{path}: tensor {name!r}: data_offsets {[begin, end]} do not hold shape {list(shape)} of {code}",
                    path=path, field=name)
  return dtype, shape, (begin, end)


def write(path: Path, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
  """Writes `tensors` as one safetensors file, atomically (temp file, then rename)."""
  header, offset = {}, 0
  for name, arr in tensors.items():
    nbytes = arr.size * arr.dtype.itemsize
    header[name] = dict(dtype=_NAMES[arr.dtype], shape=list(arr.shape), data_offsets=[offset, offset + nbytes])
    offset += nbytes
  if metadata:
    header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  tmp = Path(str(path) + ".tmp")
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for arr in tensors.values():
      f.write(np.ascontiguousarray(arr).tobytes())
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)

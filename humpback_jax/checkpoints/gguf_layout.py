"""A GGUF file's layout walked before the gguf reader maps it, so a cut or damaged file is named
with the byte offset or tensor where it goes wrong (the reader itself stops with a bare IndexError,
ValueError or `cannot reshape`). Only sizes and offsets are read; values are the reader's job.
"""
from __future__ import annotations

import math
import struct
from pathlib import Path

import gguf
import numpy as np

from humpback_jax.errors import DataError

T = gguf.GGUFValueType
_SCALARS = {T.UINT8: "<B", T.INT8: "<b", T.UINT16: "<H", T.INT16: "<h", T.UINT32: "<I", T.INT32: "<i",
            T.FLOAT32: "<f", T.BOOL: "<?", T.UINT64: "<Q", T.INT64: "<q", T.FLOAT64: "<d"}
_MAX_DIMS = 4  # ggml's GGML_MAX_DIMS


class _Cursor:
  """Reads little-endian values from the mapped file, naming what it reads when the file ends first."""

  def __init__(self, path: Path, data):
    self.path, self.data, self.offset = path, data, 0

  def fail(self, what: str, at: int, problem: str) -> DataError:
    return DataError(f"{self.path}: {what} at byte offset {at} {problem}", path=self.path, field=what)

  def need(self, nbytes: int, what: str, at: int) -> None:
    if self.offset + nbytes > len(self.data):
      raise self.fail(what, at, f"runs past the end of the file ({len(self.data)} bytes); the file is truncated "
                                "or damaged, download it again")

  def take(self, fmt: str, what: str):
    at, size = self.offset, struct.calcsize(fmt)
    self.need(size, what, at)
    self.offset += size
    return struct.unpack_from(fmt, self.data, at)[0]

  def string(self, what: str) -> str:
    at = self.offset
    n = self.take("<Q", what)
    self.need(n, what, at)
    raw = bytes(self.data[self.offset:self.offset + n])
    self.offset += n
    try:
      return raw.decode("utf-8")
    except UnicodeDecodeError:
      raise self.fail(what, at, "is not UTF-8 text; the file is damaged, download it again") from None

  def value(self, vtype: int, what: str) -> object:
    """One metadata value (arrays skipped over by their size); returns scalars and strings."""
    at = self.offset
    if vtype in _SCALARS:
      return self.take(_SCALARS[vtype], what)
    if vtype == T.STRING:
      return self.string(what)
    if vtype != T.ARRAY:
      raise self.fail(what, at, f"has unknown value type {vtype}; the file is damaged, download it again")
    item, count = self.take("<I", what), self.take("<Q", what)
    if item in _SCALARS:
      nbytes = count * struct.calcsize(_SCALARS[item])
      self.need(nbytes, what, at)
      self.offset += nbytes
    else:
      if count > len(self.data) - self.offset:  # each item takes at least one byte
        raise self.fail(what, at, f"claims {count} items, more than the file holds; the file is damaged")
      for i in range(count):
        self.value(item, f"{what}[{i}]")
    return None


def check(path) -> None:
  """Raises DataError naming the byte offset, metadata key or tensor where `path` stops being a
  complete GGUF file: a header, key, value or tensor entry cut off, or a tensor's data past the end."""
  path = Path(path)
  if path.stat().st_size < 24:
    raise DataError(f"{path}: {path.stat().st_size} bytes, shorter than a GGUF header (24 bytes); the file is "
                    "truncated or not GGUF", path=path)
  cur = _Cursor(path, np.memmap(path, mode="r"))
  if cur.take("<I", "the magic") != gguf.GGUF_MAGIC:
    raise DataError(f"{path}: not a GGUF file (no 'GGUF' magic at byte offset 0)", path=path)
  version = cur.take("<I", "the version")
  if version & 0xFFFF == 0:  # a big-endian file: the reader swaps it, and we leave it to the reader
    return
  if version not in (2, 3):
    raise cur.fail("the version", 4, f"is {version}; only GGUF versions 2 and 3 can be read")
  n_tensors, n_keys = cur.take("<Q", "the tensor count"), cur.take("<Q", "the metadata count")
  alignment = gguf.GGUF_DEFAULT_ALIGNMENT
  for i in range(n_keys):  # each entry takes bytes, so a damaged count ends at the file's end
    key = cur.string(f"metadata key #{i}")
    value = cur.value(cur.take("<I", f"the type of metadata {key!r}"), f"metadata {key!r}")
    if key == "general.alignment" and isinstance(value, int) and value > 0:
      alignment = value
  tensors = [_tensor_info(cur, i) for i in range(n_tensors)]
  data_start = -(-cur.offset // alignment) * alignment
  size = len(cur.data)
  for name, begin, nbytes in tensors:
    if data_start + begin + nbytes > size:
      raise DataError(f"{path}: tensor {name!r} needs bytes {data_start + begin}..{data_start + begin + nbytes} but "
                      f"the file ends at {size}; the file is truncated, download it again", path=path, field=name)


def _tensor_info(cur: _Cursor, i: int) -> tuple[str, int, int]:
  """(name, data offset, byte size) of tensor entry `i`."""
  at = cur.offset
  name = cur.string(f"tensor entry #{i}")
  n_dims = cur.take("<I", f"tensor {name!r}")
  if n_dims > _MAX_DIMS:
    raise cur.fail(f"tensor {name!r}", at, f"has {n_dims} dimensions (at most {_MAX_DIMS}); the file is damaged")
  dims = [cur.take("<Q", f"tensor {name!r}") for _ in range(n_dims)]
  ggml_type, offset = cur.take("<I", f"tensor {name!r}"), cur.take("<Q", f"tensor {name!r}")
  if ggml_type not in gguf.GGML_QUANT_SIZES:
    raise cur.fail(f"tensor {name!r}", at, f"has unknown ggml type {ggml_type}; the file is damaged")
  block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
  count = math.prod(dims)
  if count % block:
    raise cur.fail(f"tensor {name!r}", at, f"has {count} values, not whole blocks of {block}; the file is damaged")
  return name, offset, count // block * type_size

"""A tiny safetensors reader and writer (no dependency on the safetensors package).

File layout:
    8 bytes   little-endian u64 N, the header length
    N bytes   JSON header: {"name": {"dtype": ..., "shape": [...],
              "data_offsets": [begin, end]}, ..., "__metadata__": {"k": "v"}}
              padded with spaces to a multiple of 8
    data      tensors, contiguous little-endian, back to back in header order;
              offsets are relative to the start of the data section

Supported dtypes: F32, F16, BF16, I64, BOOL (the ones blockserve reads).

The writer orders tensors by element size, largest first (stable, so names of
one dtype keep the caller's order), like the official library: with the header
padded to 8 bytes, every tensor then starts at an address aligned to its
element size.
"""

import json
import struct

import numpy as np
import torch

# dtype name -> (torch dtype, numpy dtype used for the raw bytes, element size)
_DTYPES = {
    "F32": (torch.float32, np.dtype("<f4"), 4),
    "F16": (torch.float16, np.dtype("<f2"), 2),
    "BF16": (torch.bfloat16, np.dtype("<i2"), 2),  # raw bits, viewed as bfloat16
    "I64": (torch.int64, np.dtype("<i8"), 8),
    "BOOL": (torch.bool, np.dtype("u1"), 1),
}
_NAME_OF = {v[0]: k for k, v in _DTYPES.items()}


def _tensor_bytes(t):
    """Raw little-endian bytes of a tensor, and its safetensors dtype name."""
    if t.dtype not in _NAME_OF:
        raise TypeError(f"unsupported dtype {t.dtype}")
    name = _NAME_OF[t.dtype]
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        arr = t.view(torch.int16).numpy()
    elif t.dtype == torch.bool:
        arr = t.to(torch.uint8).numpy()
    else:
        arr = t.numpy()
    return name, arr.astype(_DTYPES[name][1], copy=False).tobytes()


def dumps(tensors, metadata=None):
    """Serialise a dict name -> tensor to safetensors bytes."""
    items = [(k, *_tensor_bytes(v), list(v.shape)) for k, v in tensors.items()]
    # Largest element size first so every tensor is naturally aligned.
    items.sort(key=lambda it: -_DTYPES[it[1]][2])
    header = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, dtype, raw, shape in items:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(it[2] for it in items)


def save(path, tensors, metadata=None):
    """Write a dict name -> tensor to path."""
    with open(path, "wb") as f:
        f.write(dumps(tensors, metadata))


def loads(buf):
    """Parse safetensors bytes: (dict name -> tensor in header order, metadata dict)."""
    if len(buf) < 8:
        raise ValueError("file shorter than 8 bytes")
    (n,) = struct.unpack("<Q", buf[:8])
    if 8 + n > len(buf):
        raise ValueError("header length past end of file")
    header = json.loads(buf[8 : 8 + n].decode("utf-8"))
    metadata = header.pop("__metadata__", {}) or {}
    data = memoryview(buf)[8 + n :]
    out = {}
    expected_begin = 0
    for name, info in header.items():
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        tdtype, npdtype, size = _DTYPES[dtype]
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if begin != expected_begin or end - begin != count * size or end > len(data):
            raise ValueError(f"{name}: bad data_offsets {begin},{end}")
        expected_begin = end
        arr = np.frombuffer(data[begin:end], dtype=npdtype).copy().reshape(shape)
        t = torch.from_numpy(arr)
        if dtype == "BF16":
            t = t.view(torch.bfloat16)
        elif dtype == "BOOL":
            if (arr > 1).any():
                raise ValueError(f"{name}: BOOL byte not 0/1")
            t = t.to(torch.bool)
        out[name] = t
    if expected_begin != len(data):
        raise ValueError("trailing bytes after the last tensor")
    return out, metadata


def load(path):
    """Read path: (dict name -> tensor in header order, metadata dict)."""
    with open(path, "rb") as f:
        return loads(f.read())

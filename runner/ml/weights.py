"""How encoder.pt and model.pt keep a network's weights (`run.weights`).

- `fp32` (the default): the state dict as it is.
- `bf16`: every floating-point tensor rounded to bfloat16 (round to nearest even) when training ends,
  in the network itself (`round_`), before anything is scored: the test numbers, the calibration and
  `predict` are all the rounded network's, so a file read back gives the same probabilities to the
  bit. The file holds each rounded tensor's two bytes per value split into two planes (high bytes,
  then low bytes) and zlib-compressed: the high plane (sign, exponent, one mantissa bit) compresses
  well, the low one hardly. About a third of fp32's size for a ResNet; other tensors (BatchNorm's
  step counter) are kept as they are.

Only plain values go in the file (strings, lists, tensors): it is read with weights_only=True.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

CODEC = "bf16-planes-zlib-1"
KEEPS = ("fp32", "bf16")


@torch.no_grad()
def round_(module: torch.nn.Module, keep: str) -> torch.nn.Module:
    """The network's floating-point parameters and buffers rounded to what `keep` stores, in place."""
    if keep == "bf16":
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point():
                t.copy_(t.to(torch.bfloat16).to(t.dtype))
    return module


def pack(state: dict, keep: str) -> dict:
    """A state dict as the file keeps it (its float tensors must already be rounded: `round_`)."""
    if keep == "fp32":
        return state
    if keep != "bf16":
        raise ValueError(f"weights: {keep!r} is not one of {', '.join(KEEPS)}")
    tensors: dict = {}
    for name, t in state.items():
        t = t.detach().to("cpu").contiguous()
        if not t.is_floating_point():
            tensors[name] = t.clone()
            continue
        b = t.to(torch.bfloat16)
        if not torch.equal(b.to(t.dtype), t):
            raise ValueError(f"weights: {name} is not rounded to bf16 (round_ the network before it is scored and kept)")
        raw = b.reshape(-1).view(torch.int16).numpy().view(np.uint8).reshape(-1, 2)  # little-endian: [low, high] per value
        planes = np.ascontiguousarray(raw[:, ::-1].T).tobytes()  # all high bytes, then all low bytes
        # a uint8 tensor, not bytes: torch.save's pickle (protocol 2) would write bytes as latin-1 text, half again larger
        data = torch.frombuffer(bytearray(zlib.compress(planes, 6)), dtype=torch.uint8)
        tensors[name] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "data": data}
    return {"codec": CODEC, "tensors": tensors}


def unpack(obj: dict) -> dict:
    """The state dict a file keeps, as tensors in their own dtype (fp32 for a bf16 file's rounded values)."""
    if not (isinstance(obj, dict) and "codec" in obj and isinstance(obj.get("tensors"), dict)):
        return obj
    if obj["codec"] != CODEC:
        raise ValueError(f"weights stored as {obj['codec']!r}, which this version does not read (it reads {CODEC!r})")
    out = {}
    for name, v in obj["tensors"].items():
        if isinstance(v, torch.Tensor):
            out[name] = v
            continue
        shape = [int(s) for s in v["shape"]]
        n = int(np.prod(shape, dtype=np.int64))
        planes = np.frombuffer(zlib.decompress(v["data"].numpy().tobytes()), dtype=np.uint8)
        if planes.size != 2 * n:
            raise ValueError(f"weights: {name} holds {planes.size} bytes, its shape {shape} needs {2 * n}")
        raw = np.ascontiguousarray(planes.reshape(2, n)[::-1].T)  # back to [low, high] per value
        b = torch.from_numpy(raw.reshape(-1).view(np.int16).copy()).view(torch.bfloat16)
        out[name] = b.to(getattr(torch, v["dtype"])).reshape(shape)
    return out

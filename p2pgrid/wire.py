"""The wire: CBOR with tensors as RFC 8746 typed arrays, and one registry of message types.

Every message is a frozen dataclass registered with :func:`message`. It travels as
CBOR tag 27 ``[type-name, {field: value}]``; decoding looks the name up in the
registry (never imports or calls anything named by the sender), checks fields
against the annotations and builds the dataclass. Tensors (torch or numpy) travel
as tag 40 ``[shape, typed-array]`` (RFC 8746, little-endian) and decode to
``torch.Tensor`` with one copy out of the received buffer.

>>> import torch
>>> @message("demo.ping")
... @dataclass(frozen=True)
... class Ping:
...     x: torch.Tensor
...     note: str = ""
>>> back = decode(encode(Ping(torch.arange(6.).reshape(2, 3), "hi")))
>>> back.x.shape, back.note
(torch.Size([2, 3]), 'hi')
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, Union

import cbor2
import numpy as np
import torch

from .errors import MalformedMessage, PayloadTooLarge

__all__ = ["message", "encode", "decode", "dumps", "loads", "registered", "dataclass",
           "DEFAULT_MAX_BODY"]

DEFAULT_MAX_BODY = 1 << 30  # 1 GiB; peers lower or raise it in PeerConfig

# RFC 8746 typed-array tags, little-endian forms (what we emit), plus big-endian
# forms we accept on decode.
_DTYPE_TO_TAG = {
    np.dtype("uint8"): 64, np.dtype("<u2"): 69, np.dtype("<u4"): 70, np.dtype("<u8"): 71,
    np.dtype("int8"): 72, np.dtype("<i2"): 77, np.dtype("<i4"): 78, np.dtype("<i8"): 79,
    np.dtype("<f2"): 84, np.dtype("<f4"): 85, np.dtype("<f8"): 86,
}
_TAG_TO_DTYPE = {tag: dt for dt, tag in _DTYPE_TO_TAG.items()}
_TAG_TO_DTYPE.update({
    65: np.dtype(">u2"), 66: np.dtype(">u4"), 67: np.dtype(">u8"),
    73: np.dtype(">i2"), 74: np.dtype(">i4"), 75: np.dtype(">i8"),
    80: np.dtype(">f2"), 81: np.dtype(">f4"), 82: np.dtype(">f8"),
    68: np.dtype("uint8"),  # uint8 clamped: same bytes
})
# dtypes RFC 8746 has no tag for travel under a private tag [name, shape, bytes].
_TAG_EXT_ARRAY = 59001
_EXT_DTYPES = {"bool": (torch.bool, np.dtype("uint8")), "bfloat16": (torch.bfloat16, np.dtype("<i2")),
               "complex64": (torch.complex64, np.dtype("<c8"))}
_TAG_MESSAGE = 27
_TAG_NDARRAY = 40

_MESSAGES: dict[str, type] = {}
_NAMES: dict[type, str] = {}
_HINTS: dict[type, dict[str, Any]] = {}


def message(name: str):
    """Register a frozen dataclass as a wire message under `name` (unique, stable)."""

    def deco(cls):
        if not dataclasses.is_dataclass(cls):
            cls = dataclass(frozen=True)(cls)
        if name in _MESSAGES and _MESSAGES[name] is not cls:
            raise ValueError(f"message name {name!r} registered twice")
        _MESSAGES[name] = cls
        _NAMES[cls] = name
        return cls

    return deco


def registered() -> dict[str, type]:
    return dict(_MESSAGES)


# ---------------------------------------------------------------- encoding

def _tensor_to_cbor(t: torch.Tensor):
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    shape = list(t.shape)
    name = str(t.dtype).removeprefix("torch.")
    if name in _EXT_DTYPES:
        _, npdt = _EXT_DTYPES[name]
        raw = t.view(torch.int16) if name == "bfloat16" else t
        return cbor2.CBORTag(_TAG_EXT_ARRAY, [name, shape, _raw_bytes(raw.numpy().view(npdt))])
    return _ndarray_to_cbor(t.numpy(), shape)


def _raw_bytes(arr: np.ndarray) -> bytes:
    return arr.tobytes()


def _ndarray_to_cbor(arr: np.ndarray, shape=None):
    shape = list(arr.shape) if shape is None else shape
    dt = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
    if arr.dtype == np.bool_:
        return cbor2.CBORTag(_TAG_EXT_ARRAY, ["bool", shape, np.ascontiguousarray(arr).view(np.uint8).tobytes()])
    if dt not in _DTYPE_TO_TAG:
        raise MalformedMessage(f"dtype {arr.dtype} cannot travel on the wire")
    arr = np.ascontiguousarray(arr, dtype=dt)
    return cbor2.CBORTag(_TAG_NDARRAY, [shape, cbor2.CBORTag(_DTYPE_TO_TAG[dt], arr.tobytes())])


def _default(encoder, value):
    if isinstance(value, torch.Tensor):
        encoder.encode(_tensor_to_cbor(value))
    elif isinstance(value, np.ndarray):
        encoder.encode(_ndarray_to_cbor(value))
    elif isinstance(value, np.generic):
        encoder.encode(value.item())
    elif type(value) in _NAMES:
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        encoder.encode(cbor2.CBORTag(_TAG_MESSAGE, [_NAMES[type(value)], fields]))
    elif isinstance(value, (tuple, set, frozenset)):
        encoder.encode(list(value))
    elif isinstance(value, torch.Size):
        encoder.encode(list(value))
    else:
        raise TypeError(f"cannot encode {type(value).__name__} on the wire")


def dumps(obj) -> bytes:
    """CBOR-encode any wire value (messages, tensors, plain data)."""
    try:
        return cbor2.dumps(obj, default=_default)
    except (TypeError, cbor2.CBOREncodeError) as e:
        raise MalformedMessage(f"cannot encode: {e}") from None


def encode(msg) -> bytes:
    if type(msg) not in _NAMES:
        raise TypeError(f"{type(msg).__name__} is not a registered message")
    return dumps(msg)


# ---------------------------------------------------------------- decoding

def _as_tensor(arr: np.ndarray) -> torch.Tensor:
    # cbor2 may hand back byte strings that alias its input buffer, so a tensor
    # over them could change under another decoded value: copy once, here.
    if arr.dtype.byteorder == ">":
        return torch.from_numpy(arr.astype(arr.dtype.newbyteorder("<")))
    return torch.from_numpy(arr.copy())


def _check_shape(shape, count: int, what: str) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in shape):
        raise MalformedMessage(f"{what}: shape must be a list of non-negative ints")
    if len(shape) > 32:
        raise MalformedMessage(f"{what}: more than 32 dimensions")
    n = 1
    for d in shape:
        n *= d
    if n != count:
        raise MalformedMessage(f"{what}: shape {list(shape)} needs {n} elements, got {count}")
    return tuple(shape)


def _tag_hook(tag, immutable=False):
    t = tag.tag
    if t in _TAG_TO_DTYPE:
        if not isinstance(tag.value, bytes):
            raise MalformedMessage(f"typed array tag {t} must wrap a byte string")
        dt = _TAG_TO_DTYPE[t]
        if len(tag.value) % dt.itemsize:
            raise MalformedMessage(f"typed array of {dt} has {len(tag.value)} bytes, "
                                   f"not a multiple of {dt.itemsize}")
        return np.frombuffer(tag.value, dtype=dt)
    if t == _TAG_NDARRAY:
        v = tag.value
        if not (isinstance(v, (list, tuple)) and len(v) == 2 and isinstance(v[1], np.ndarray)):
            raise MalformedMessage("tag 40 must hold [shape, typed array]")
        shape = _check_shape(v[0], v[1].size, "tensor")
        return _as_tensor(v[1].reshape(shape))
    if t == _TAG_EXT_ARRAY:
        v = tag.value
        if not (isinstance(v, (list, tuple)) and len(v) == 3 and v[0] in _EXT_DTYPES
                and isinstance(v[2], bytes)):
            raise MalformedMessage("extended array must hold [dtype, shape, bytes] of a known dtype")
        tdt, npdt = _EXT_DTYPES[v[0]]
        if len(v[2]) % npdt.itemsize:
            raise MalformedMessage(f"{v[0]} array has a ragged byte count")
        arr = np.frombuffer(v[2], dtype=npdt)
        shape = _check_shape(v[1], arr.size, v[0])
        ten = _as_tensor(arr.reshape(shape))
        if v[0] == "bool":
            if ten.numel() and int(ten.max()) > 1:
                raise MalformedMessage("bool array holds values other than 0 and 1")
            return ten.to(torch.bool)
        return ten.view(tdt)
    if t == _TAG_MESSAGE:
        v = tag.value
        if not (isinstance(v, (list, tuple)) and len(v) == 2 and isinstance(v[0], str)
                and isinstance(v[1], Mapping)):
            raise MalformedMessage("tag 27 must hold [message-name, {fields}]")
        return _build(v[0], v[1])
    raise MalformedMessage(f"unknown CBOR tag {t}")


def _hints(cls) -> dict[str, Any]:
    if cls not in _HINTS:
        mod = sys.modules.get(cls.__module__)
        _HINTS[cls] = typing.get_type_hints(cls, vars(mod) if mod else None)
    return _HINTS[cls]


def _build(name: str, fields: dict):
    cls = _MESSAGES.get(name)
    if cls is None:
        raise MalformedMessage(f"unknown message type {name!r}")
    hints = _hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    extra = set(fields) - set(known)
    if extra:
        raise MalformedMessage(f"{name}: unknown fields {sorted(map(str, extra))}")
    kwargs = {}
    for fname, f in known.items():
        if fname not in fields:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise MalformedMessage(f"{name}: missing field {fname!r}")
            continue
        kwargs[fname] = _coerce(fields[fname], hints[fname], f"{name}.{fname}")
    return cls(**kwargs)


_ANY_SEQ = (list, tuple)


def _thaw(value):
    """cbor2 hands values inside tags back frozen (tuples, frozendicts); thaw them."""
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def _coerce(value, hint, where: str):
    """Check `value` against the annotation `hint`; convert lists/tuples where asked."""
    if hint is Any or hint is object:
        return _thaw(value)
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        errors = []
        for arg in typing.get_args(hint):
            try:
                return _coerce(value, arg, where)
            except MalformedMessage as e:
                errors.append(e)
        raise MalformedMessage(f"{where}: {type(value).__name__} fits none of {hint}")
    if hint is type(None):
        if value is None:
            return None
        raise MalformedMessage(f"{where}: expected null")
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, _ANY_SEQ):
            raise MalformedMessage(f"{where}: expected a list, got {type(value).__name__}")
        args = typing.get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise MalformedMessage(f"{where}: expected {len(args)} items")
            return tuple(_coerce(v, a, where) for v, a in zip(value, args))
        item = args[0] if args else Any
        out = [_coerce(v, item, where) for v in value]
        return tuple(out) if (origin or hint) is tuple else out
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise MalformedMessage(f"{where}: expected a map, got {type(value).__name__}")
        args = typing.get_args(hint) or (Any, Any)
        return {_coerce(k, args[0], where): _coerce(v, args[1], where) for k, v in value.items()}
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is bytes:
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    raise MalformedMessage(f"{where}: expected {getattr(hint, '__name__', hint)}, "
                           f"got {type(value).__name__}")


def loads(data, *, max_size: int = DEFAULT_MAX_BODY):
    """Decode CBOR bytes from the wire; any defect becomes MalformedMessage."""
    if len(data) > max_size:
        raise PayloadTooLarge(f"body of {len(data)} bytes exceeds the limit of {max_size}")
    try:
        return cbor2.loads(data, tag_hook=_tag_hook, max_depth=64, strict_hashable_types=True)
    except MalformedMessage:
        raise
    except cbor2.CBORDecodeError as e:
        cause = e.__cause__
        if isinstance(cause, MalformedMessage):
            raise cause from None
        raise MalformedMessage(f"body is not valid CBOR: {e}") from None
    except (MemoryError, OverflowError, ValueError, TypeError, RecursionError) as e:
        raise MalformedMessage(f"body is not valid CBOR: {type(e).__name__}") from None


def decode(data, expect: type | None = None, *, max_size: int = DEFAULT_MAX_BODY):
    """Decode one registered message; with `expect`, insist on that type."""
    obj = loads(data, max_size=max_size)
    if type(obj) not in _NAMES:
        raise MalformedMessage("body is CBOR but not a registered message")
    if expect is not None and not isinstance(obj, expect):
        raise MalformedMessage(f"expected {_NAMES.get(expect, expect.__name__)}, "
                               f"got {_NAMES[type(obj)]}")
    return obj

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
import functools
import os
import sys
import types
import typing
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, Union

import cbor2
import numpy as np
import torch

from . import buffers
from .errors import MalformedMessage, PayloadTooLarge

__all__ = ["message", "encode", "encode_buffer", "encode_parts", "decode", "dumps", "dumps_parts", "loads",
           "registered", "dataclass", "DEFAULT_MAX_BODY"]

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
_PLANS: dict[type, tuple[set, list]] = {}  # class -> (field names, checks)


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
#
# Arrays are written with the encoder's low-level calls (tag, array and byte
# string headers) rather than as CBORTag objects around ``arr.tobytes()``: the
# bytes are the same, but a large array's payload can then be left out of
# cbor2's output (which copies everything it writes, twice as it grows) and
# spliced in afterwards. See :func:`encode_parts`.

BIG = 1 << 16  # arrays at least this many bytes travel as views in encode_parts


class _Views:
    """Payloads left out of one encoding: each stands in the output as a marker
    (a random per-encoding prefix and its index) that cannot occur otherwise."""

    def __init__(self):
        self.prefix = os.urandom(16)
        self.views: list[memoryview] = []

    def add(self, encoder, arr: np.ndarray) -> None:
        view = memoryview(arr).cast("B")  # C-contiguous (callers made sure)
        encoder.encode_length(2, view.nbytes)  # byte string header; payload comes later
        encoder.write(self.prefix + len(self.views).to_bytes(4, "big"))
        self.views.append(view)

    def splice(self, skeleton: bytes) -> list:
        parts, start = [], 0
        for i, view in enumerate(self.views):
            at = skeleton.index(self.prefix + i.to_bytes(4, "big"), start)
            parts += [skeleton[start:at], view]
            start = at + 20
        parts.append(skeleton[start:])
        return [p for p in parts if len(p)]


def _write_payload(encoder, arr: np.ndarray, views: _Views | None) -> None:
    if views is not None and arr.nbytes >= BIG:
        views.add(encoder, arr)
    else:
        encoder.encode(arr.tobytes())


def _write_tensor(encoder, t: torch.Tensor, views: _Views | None) -> None:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    shape = list(t.shape)
    name = str(t.dtype).removeprefix("torch.")
    if name in _EXT_DTYPES:
        _, npdt = _EXT_DTYPES[name]
        raw = t.view(torch.int16) if name == "bfloat16" else t
        _write_ext(encoder, name, shape, raw.numpy().view(npdt), views)
    else:
        _write_ndarray(encoder, t.numpy(), shape, views)


def _write_ext(encoder, name: str, shape, arr: np.ndarray, views: _Views | None) -> None:
    encoder.encode_length(6, _TAG_EXT_ARRAY)  # [name, shape, bytes]
    encoder.encode_length(4, 3)
    encoder.encode(name)
    encoder.encode(shape)
    _write_payload(encoder, arr, views)


def _write_ndarray(encoder, arr: np.ndarray, shape, views: _Views | None) -> None:
    shape = list(arr.shape) if shape is None else shape
    dt = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
    if arr.dtype == np.bool_:
        _write_ext(encoder, "bool", shape, np.ascontiguousarray(arr).view(np.uint8), views)
        return
    if dt not in _DTYPE_TO_TAG:
        raise MalformedMessage(f"dtype {arr.dtype} cannot travel on the wire")
    arr = np.ascontiguousarray(arr, dtype=dt)
    encoder.encode_length(6, _TAG_NDARRAY)  # [shape, typed array]
    encoder.encode_length(4, 2)
    encoder.encode(shape)
    encoder.encode_length(6, _DTYPE_TO_TAG[dt])
    _write_payload(encoder, arr, views)


def _default(encoder, value, views: _Views | None = None):
    if isinstance(value, torch.Tensor):
        _write_tensor(encoder, value, views)
    elif isinstance(value, np.ndarray):
        _write_ndarray(encoder, value, None, views)
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


def dumps_parts(obj) -> list:
    """:func:`dumps` as a list of buffers whose concatenation is ``dumps(obj)``.

    Arrays of :data:`BIG` bytes or more are not copied: their parts are
    read-only views of the arrays' memory, so they show later changes to them.
    The transport copies once into its send buffer instead of three times.
    """
    views = _Views()
    try:
        skeleton = cbor2.dumps(obj, default=lambda e, v: _default(e, v, views))
    except (TypeError, cbor2.CBOREncodeError) as e:
        raise MalformedMessage(f"cannot encode: {e}") from None
    return views.splice(skeleton) if views.views else [skeleton]


def encode(msg) -> bytes:
    if type(msg) not in _NAMES:
        raise TypeError(f"{type(msg).__name__} is not a registered message")
    parts = dumps_parts(msg)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def owned(msg):
    """Mark `msg` as the only holder of its tensors (a value just loaded, say): the transport
    may then send them by reference instead of copying a snapshot first. Returns `msg`."""
    object.__setattr__(msg, "_p2p_owned", True)
    return msg


def is_owned(msg) -> bool:
    return getattr(msg, "_p2p_owned", False)


_SCALARS = frozenset({str, int, float, bool, type(None)})


def payload_bytes(msg) -> int:
    """Bytes of the tensors, arrays and byte strings a message holds, nested messages,
    lists and dicts included: about how large its encoding is without encoding it, and so
    whether encoding it is heavy work (and how much a held reply weighs)."""
    total, todo = 0, [msg]
    while todo:
        v = todo.pop()
        t = type(v)
        if t in _SCALARS:   # most of a large listing: skipped before any isinstance
            continue
        if t is dict:
            todo.extend(v.values())
        elif t is list or t is tuple:
            todo.extend(v)
        elif t is bytes or t is bytearray:
            total += len(v)
        elif t in _NAMES:
            todo.extend(getattr(v, f.name) for f in dataclasses.fields(v))
        elif isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
        elif isinstance(v, (memoryview, np.ndarray)):
            total += v.nbytes
        elif isinstance(v, (bytes, bytearray)):
            total += len(v)
        elif isinstance(v, dict):
            todo.extend(v.values())
        elif isinstance(v, (list, tuple)):
            todo.extend(v)
    return total


def encode_buffer(msg):
    """:func:`encode` into one buffer, built with one copy of each large array.

    Bytes for a message without large arrays; otherwise a memoryview of a uint8
    array (warm memory from :mod:`p2pgrid.buffers` when large): several times quicker
    to fill than a bytes object of hundreds of MB. A snapshot, like encode().
    """
    parts = encode_parts(msg)
    if len(parts) == 1:
        return parts[0]
    buf = buffers.take(sum(len(p) for p in parts))   # warm memory, see p2pgrid.buffers
    at = 0
    for p in parts:
        buf[at:at + len(p)] = np.frombuffer(p, dtype=np.uint8)
        at += len(p)
    return memoryview(buf)


def encode_parts(msg) -> list:
    """:func:`encode` as buffers, large arrays by reference (see :func:`dumps_parts`)."""
    if type(msg) not in _NAMES:
        raise TypeError(f"{type(msg).__name__} is not a registered message")
    return dumps_parts(msg)


# ---------------------------------------------------------------- decoding

def _as_tensor(arr: np.ndarray) -> torch.Tensor:
    # cbor2 may hand back byte strings that alias its input buffer, so a tensor
    # over them could change under another decoded value: copy once, here.
    # Only an array over a body handed to loads(adopt=True), used once and
    # aligned, is writable here (see _skeleton): the tensor can keep it.
    if arr.dtype.byteorder == ">":
        return torch.from_numpy(arr.astype(arr.dtype.newbyteorder("<")))
    if arr.flags.writeable and arr.flags.aligned:
        return torch.from_numpy(arr)
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


def _tag_hook(tag, immutable=False, payloads=None):
    t = tag.tag
    if t in _TAG_TO_DTYPE:
        value = _payload(tag.value, payloads)
        if not isinstance(value, (bytes, memoryview)):
            raise MalformedMessage(f"typed array tag {t} must wrap a byte string")
        dt = _TAG_TO_DTYPE[t]
        if len(value) % dt.itemsize:
            raise MalformedMessage(f"typed array of {dt} has {len(value)} bytes, "
                                   f"not a multiple of {dt.itemsize}")
        return np.frombuffer(value, dtype=dt)
    if t == _TAG_NDARRAY:
        v = tag.value
        if not (isinstance(v, (list, tuple)) and len(v) == 2 and isinstance(v[1], np.ndarray)):
            raise MalformedMessage("tag 40 must hold [shape, typed array]")
        shape = _check_shape(v[0], v[1].size, "tensor")
        return _as_tensor(v[1].reshape(shape))
    if t == _TAG_EXT_ARRAY:
        v = tag.value
        if isinstance(v, (list, tuple)) and len(v) == 3:
            v = (v[0], v[1], _payload(v[2], payloads))
        if not (isinstance(v, (list, tuple)) and len(v) == 3 and v[0] in _EXT_DTYPES
                and isinstance(v[2], (bytes, memoryview))):
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


def _fields_of(cls) -> tuple[dict, list]:
    """The checks `_build` runs for `cls`, compiled from its annotations once."""
    plan = _PLANS.get(cls)
    if plan is None:
        mod = sys.modules.get(cls.__module__)
        hints = typing.get_type_hints(cls, vars(mod) if mod else None)
        name = _NAMES[cls]
        plan = _PLANS[cls] = (
            {f.name for f in dataclasses.fields(cls)},
            [(f.name, f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
              _checker(hints[f.name]), f"{name}.{f.name}") for f in dataclasses.fields(cls)])
    return plan


def _build(name: str, fields: dict):
    cls = _MESSAGES.get(name)
    if cls is None:
        raise MalformedMessage(f"unknown message type {name!r}")
    known, checks = _fields_of(cls)
    if len(fields) > len(known) or not known.issuperset(fields):
        extra = set(fields) - known
        raise MalformedMessage(f"{name}: unknown fields {sorted(map(str, extra))}")
    kwargs = {}
    for fname, required, check, where in checks:
        if fname in fields:
            kwargs[fname] = check(fields[fname], where)
        elif required:
            raise MalformedMessage(f"{name}: missing field {fname!r}")
    return cls(**kwargs)


_ANY_SEQ = (list, tuple)


def _thaw(value):
    """cbor2 hands values inside tags back frozen (tuples, frozendicts); thaw them."""
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def _fail(where: str, hint, value):
    raise MalformedMessage(f"{where}: expected {getattr(hint, '__name__', hint)}, "
                           f"got {type(value).__name__}")


@functools.lru_cache(maxsize=None)
def _checker(hint):
    """A function (value, where) -> value that checks `value` against the annotation
    `hint` and converts lists/tuples where asked; built once per annotation, because
    decoding each message field by field through typing's introspection cost more
    than the rest of its decoding."""
    if hint is Any or hint is object:
        return lambda v, where: _thaw(v)
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = [_checker(a) for a in typing.get_args(hint)]

        def union(v, where):
            for check in options:
                try:
                    return check(v, where)
                except MalformedMessage:
                    pass
            raise MalformedMessage(f"{where}: {type(v).__name__} fits none of {hint}")
        return union
    if hint is type(None):
        def none(v, where):
            if v is None:
                return None
            raise MalformedMessage(f"{where}: expected null")
        return none
    if origin in (list, tuple) or hint in (list, tuple):
        args = typing.get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            items = [_checker(a) for a in args]

            def fixed(v, where):
                if not isinstance(v, _ANY_SEQ):
                    raise MalformedMessage(f"{where}: expected a list, got {type(v).__name__}")
                if len(items) != len(v):
                    raise MalformedMessage(f"{where}: expected {len(items)} items")
                return tuple(check(x, where) for x, check in zip(v, items))
            return fixed
        item = _checker(args[0] if args else Any)
        as_tuple = (origin or hint) is tuple

        def seq(v, where):
            if not isinstance(v, _ANY_SEQ):
                raise MalformedMessage(f"{where}: expected a list, got {type(v).__name__}")
            out = [item(x, where) for x in v]
            return tuple(out) if as_tuple else out
        return seq
    if origin is dict or hint is dict:
        kt, vt = typing.get_args(hint) or (Any, Any)
        key, val = _checker(kt), _checker(vt)

        def mapping(v, where):
            if not isinstance(v, Mapping):
                raise MalformedMessage(f"{where}: expected a map, got {type(v).__name__}")
            return {key(k, where): val(x, where) for k, x in v.items()}
        return mapping
    if hint is float:
        def real(v, where):
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return float(v)
            _fail(where, hint, v)
        return real
    if hint is int:
        def integer(v, where):
            if isinstance(v, int) and not isinstance(v, bool):
                return v
            _fail(where, hint, v)
        return integer
    if hint is bytes:
        def raw(v, where):
            if isinstance(v, (bytes, bytearray)):
                return bytes(v)
            _fail(where, hint, v)
        return raw
    if isinstance(hint, type):
        def instance(v, where):
            if isinstance(v, hint):
                return v
            _fail(where, hint, v)
        return instance

    def never(v, where):
        _fail(where, hint, v)
    return never


# Large typed arrays skip cbor2 on the way in, too: cbor2 reads a byte string
# of hundreds of MB at about 450 MB/s (in chunks, then joined), after which
# _as_tensor copies it once more. A scan of the item heads (never of payloads)
# finds the payloads of typed-array tags that are at least BIG bytes; cbor2
# then decodes a skeleton in which each stands as a 20-byte marker (a random
# per-call prefix and its index), and the tag hook reads the payload straight
# from the body. The scan gives up, and cbor2 sees the body as it is, on
# anything it does not need to understand (indefinite lengths, reserved
# values, many items, truncation, trailing bytes): cbor2 has the last word.

_SCAN_ITEMS = 4096  # heads the scan reads before leaving a body to cbor2


def _payload(value, payloads):
    if payloads and type(value) is bytes and len(value) == 20 and value in payloads:
        view = payloads[value]
        # A payload referred to twice (CBOR string references allow it) is
        # read-only the second time, so no two tensors share memory.
        payloads[value] = view.toreadonly()
        return view
    return value


def _big_payloads(view: memoryview) -> list[tuple[int, int, int]] | None:
    """[(head, start, length)] of typed-array payloads of BIG bytes or more, in order."""
    n, pos, items, found = len(view), 0, 0, []
    stack = [[1, None]]  # [items left, owner]: owner is ("tag", number) or "ext" or None
    while stack:
        frame = stack[-1]
        if frame[0] == 0:
            stack.pop()
            continue
        frame[0] -= 1
        items += 1
        if items > _SCAN_ITEMS or pos >= n:
            return None
        major, ai = view[pos] >> 5, view[pos] & 31
        if ai < 24:
            arg, size = ai, 1
        elif ai < 28:
            size = 1 + (1 << (ai - 24))
            if pos + size > n:
                return None
            arg = int.from_bytes(view[pos + 1:pos + size], "big")
        else:
            return None  # indefinite length, break, reserved
        head, pos = pos, pos + size
        if major in (2, 3):
            if arg > n - pos:
                return None
            owner = frame[1]
            if major == 2 and arg >= BIG and (
                    (owner is not None and owner[0] == "tag" and owner[1] in _TAG_TO_DTYPE)
                    or (owner == "ext" and frame[0] == 0)):
                found.append((head, pos, arg))
            pos += arg
        elif major == 4:
            stack.append([arg, "ext" if frame[1] == ("tag", _TAG_EXT_ARRAY) and arg == 3 else None])
        elif major == 5:
            stack.append([2 * arg, None])
        elif major == 6:
            stack.append([1, ("tag", arg)])
    return found if pos == n else None


def _skeleton(data, adopt: bool) -> tuple[bytes, dict[bytes, memoryview]] | None:
    view = memoryview(data).cast("B")
    found = _big_payloads(view) if len(view) >= BIG else None
    if not found:
        return None
    prefix, pieces, payloads, at = os.urandom(16), [], {}, 0
    # read-only unless adopted, so that arrays over it are copied, as over bytes
    body = view if adopt else view.toreadonly()
    for i, (head, start, length) in enumerate(found):
        marker = prefix + i.to_bytes(4, "big")
        pieces += [view[at:head], b"\x54", marker]  # 0x54: byte string of 20 bytes
        payloads[marker] = body[start:start + length]
        at = start + length
    pieces.append(view[at:])
    return b"".join(pieces), payloads


def loads(data, *, max_size: int = DEFAULT_MAX_BODY, adopt: bool = False):
    """Decode CBOR bytes from the wire; any defect becomes MalformedMessage.

    ``adopt=True`` hands `data` over (a writable buffer nobody else uses or
    changes): large tensors may then be views of it instead of copies.
    """
    if len(data) > max_size:
        raise PayloadTooLarge(f"body of {len(data)} bytes exceeds the limit of {max_size}")
    try:
        split = _skeleton(data, adopt)
        if split is not None:
            data, payloads = split
            hook = lambda tag, immutable=False: _tag_hook(tag, immutable, payloads)  # noqa: E731
        else:
            hook = _tag_hook
        return cbor2.loads(data, tag_hook=hook, max_depth=64, strict_hashable_types=True)
    except MalformedMessage:
        raise
    except cbor2.CBORDecodeError as e:
        cause = e.__cause__
        if isinstance(cause, MalformedMessage):
            raise cause from None
        raise MalformedMessage(f"body is not valid CBOR: {e}") from None
    except (MemoryError, OverflowError, ValueError, TypeError, RecursionError) as e:
        raise MalformedMessage(f"body is not valid CBOR: {type(e).__name__}") from None


def decode(data, expect: type | None = None, *, max_size: int = DEFAULT_MAX_BODY,
           adopt: bool = False):
    """Decode one registered message; with `expect`, insist on that type (`adopt`: see loads)."""
    obj = loads(data, max_size=max_size, adopt=adopt)
    if type(obj) not in _NAMES:
        raise MalformedMessage("body is CBOR but not a registered message")
    if expect is not None and not isinstance(obj, expect):
        raise MalformedMessage(f"expected {_NAMES.get(expect, expect.__name__)}, "
                               f"got {_NAMES[type(obj)]}")
    return obj

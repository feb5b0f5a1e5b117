import cbor2
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from p2pgrid import wire
from p2pgrid.errors import MalformedMessage, PayloadTooLarge
from p2pgrid.messages import Execute, PutObject

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int16,
          torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 3), (2, 0, 4), (1, 2, 3, 4)])
def test_tensor_round_trip(dtype, shape):
    x = (torch.randn(shape) * 10).to(dtype) if dtype != torch.bool else torch.randn(shape) > 0
    back = wire.loads(wire.dumps({"x": x}))["x"]
    assert back.dtype == dtype and back.shape == x.shape
    assert torch.equal(back, x)


def test_tensor_is_rfc8746_typed_array():
    raw = wire.dumps(torch.arange(6, dtype=torch.float32).reshape(2, 3))
    tag = cbor2.loads(raw)
    assert tag.tag == 40 and list(tag.value[0]) == [2, 3]
    assert tag.value[1].tag == 85  # float32 little-endian
    assert np.frombuffer(tag.value[1].value, "<f4").tolist() == [0, 1, 2, 3, 4, 5]


def test_big_endian_typed_array_decodes():
    be = cbor2.dumps(cbor2.CBORTag(40, [[3], cbor2.CBORTag(81, np.array([1, 2, 3], ">f4").tobytes())]))
    assert wire.loads(be).tolist() == [1.0, 2.0, 3.0]


def test_decoded_tensors_are_writable_and_independent():
    x = torch.arange(1 << 18)
    raw = wire.dumps([x, x])
    a, b = wire.loads(raw)
    a += 1
    assert torch.equal(b, x) and torch.equal(a - 1, x)
    assert torch.equal(wire.loads(raw)[0], x)  # the buffer itself is untouched


def test_non_contiguous_and_views():
    x = torch.arange(12.).reshape(3, 4).t()
    assert torch.equal(wire.loads(wire.dumps(x)), x)


def test_message_round_trip_and_validation():
    msg = PutObject(torch.ones(2), ["a", "b"], "desc", None)
    back = wire.decode(wire.encode(msg), PutObject)
    assert back.tags == ["a", "b"] and back.rules is None and torch.equal(back.tensor, msg.tensor)
    with pytest.raises(MalformedMessage, match="expected rt.exec, got rt.put"):
        wire.decode(wire.encode(msg), Execute)


@pytest.mark.parametrize("payload, match", [
    (cbor2.CBORTag(27, ["no.such.message", {}]), "unknown message type"),
    (cbor2.CBORTag(27, ["rt.put", {"tensor": 3}]), "expected Tensor"),
    (cbor2.CBORTag(27, ["rt.put", {}]), "missing field"),
    (cbor2.CBORTag(27, ["rt.get", {"id": "x", "evil": 1}]), "unknown fields"),
    (cbor2.CBORTag(40, [[2, 2], cbor2.CBORTag(85, b"\0" * 12)]), "needs 4 elements"),
    (cbor2.CBORTag(85, b"\0" * 3), "not a multiple"),
    (cbor2.CBORTag(9999, 1), "unknown CBOR tag"),
    ({"not": "a message"}, "not a registered message"),
])
def test_malformed_messages_are_typed_errors(payload, match):
    with pytest.raises(MalformedMessage, match=match):
        wire.decode(cbor2.dumps(payload))


@pytest.mark.parametrize("raw", [
    b"", b"\xff", b"\x9b\xff\xff\xff\xff\xff\xff\xff\xff",  # array of 2^64-1 items
    b"\x5b\x7f\xff\xff\xff\xff\xff\xff\xff",                # byte string of 2^63 bytes
    b"\x81" * 10000,                                         # nesting bomb
])
def test_hostile_bodies(raw):
    with pytest.raises(MalformedMessage):
        wire.decode(raw)


def test_size_limit():
    with pytest.raises(PayloadTooLarge):
        wire.loads(b"\x00" * 100, max_size=10)


@given(st.binary(max_size=300))
def test_fuzz_random_bytes_never_crash(raw):
    try:
        wire.decode(raw)
    except MalformedMessage:
        pass


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5) | st.binary(max_size=5),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3),
                    max_leaves=10))
def test_fuzz_valid_cbor_as_message_fields(fields):
    raw = cbor2.dumps(cbor2.CBORTag(27, ["rt.exec", {"program": fields}]))
    try:
        msg = wire.decode(raw)
        assert isinstance(msg.program, dict)
    except MalformedMessage:
        pass


def test_payload_bytes_counts_tensors_arrays_and_byte_strings():
    from p2pgrid.calls import CallReply
    from p2pgrid.messages import PutObject
    assert wire.payload_bytes(PutObject(torch.zeros(10, dtype=torch.int64))) == 80
    assert wire.payload_bytes(CallReply(1, 200, b"x" * 1000)) == 1000
    assert wire.payload_bytes(object()) == 0


def test_payload_bytes_counts_what_nested_messages_hold():
    # a dealer's reply holds its arrays two levels down: counted as 0, it was encoded on
    # the event loop (twice) and its held copy escaped the per-caller byte bound
    from p2pgrid.smpc.messages import Dealt, Material
    item = Material("triple", 1, b"s" * 16, (("c", (10,)),), {"c": torch.zeros(10, dtype=torch.int64)})
    assert wire.payload_bytes(item) == 16 + 80
    assert wire.payload_bytes(Dealt([item, item], more=[[item]])) == 3 * 96
    assert wire.payload_bytes({"a": [torch.zeros(4, dtype=torch.int32), (b"xy",)]}) == 18
    assert wire.payload_bytes([torch.nn.Parameter(torch.zeros(3)), "text", 7, None]) == 12

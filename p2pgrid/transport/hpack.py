"""hpack: header values sent as plain literals, without Huffman coding.

- **Pure-Python Huffman coding.** hpack 4.2.0's ``Encoder.encode`` Huffman-codes every
  header value by default, in pure Python, at about 0.2 us a byte, and the other side
  decodes it the same way. Our signature headers are ~250 bytes of fresh base64 and hex
  per request, which Huffman shrinks by only a fifth. ``huffman=False`` is hpack's own
  parameter and the output is valid HPACK (RFC 7541 5.2, H=0); the dynamic table works
  the same. Not a bug: a trade-off that suits a LAN/WAN peer with small headers.
  h2 gives no way to pass ``huffman=`` through ``send_headers``, so :func:`plain_headers`
  binds it on one connection's encoder. Scope: the connections it is called on (the
  peer's server and client connections). Remove if h2 ever exposes the choice.
"""

from __future__ import annotations

import functools


def plain_headers(connection) -> None:
    """Make the h2 `connection` encode header values as plain literals."""
    connection.encoder.encode = functools.partial(type(connection.encoder).encode,
                                                  connection.encoder, huffman=False)

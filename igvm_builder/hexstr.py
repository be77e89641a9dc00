"""Hex text as people and documents write it: the one parser for keys' digests, IDs and digests."""

from __future__ import annotations


def parse_hex(text: str, *, dashes: bool = False) -> bytes:
    """The bytes of hex ``text``: surrounding whitespace and a ``0x``/``0X`` prefix are ignored,
    and with ``dashes`` the ``-`` of a GUID-style ID.  ValueError if the rest is not hex digits
    in pairs (the caller says which field and how many bytes it wants)."""
    body = text.strip()
    if body[:2] in ("0x", "0X"):
        body = body[2:]
    if dashes:
        body = body.replace("-", "")
    return bytes.fromhex(body)  # (ValueError names the first bad character)

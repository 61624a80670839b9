"""Stable names derived from content, never from list positions."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import socket

_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"  # RFC 4648 base32
_PAIRS = tuple(a + b for a in _B32 for b in _B32)  # every 10-bit value as two characters
_sha256 = hashlib.sha256


def digest(text: str, length: int = 16) -> str:
    """The first `length` base32 characters of sha256(text): upper case, A-Z and 2-7."""
    raw = _sha256(text.encode()).digest()
    if length == 16:
        # Sixteen characters are the first 80 bits, two characters per 10 bits: the
        # same text as base64.b32encode, without its per-call work (lowering makes
        # one id per endpoint and service port).
        n = int.from_bytes(raw[:10])
        p = _PAIRS
        return (
            f"{p[n >> 70]}{p[(n >> 60) & 1023]}{p[(n >> 50) & 1023]}{p[(n >> 40) & 1023]}"
            f"{p[(n >> 30) & 1023]}{p[(n >> 20) & 1023]}{p[(n >> 10) & 1023]}{p[n & 1023]}"
        )
    # Base32 turns each 5 bytes into 8 characters on its own: encoding only the bytes
    # the first `length` characters come from gives the same characters.
    return base64.b32encode(raw[: (length * 5 + 7) // 8])[:length].decode()


def service_port_name(namespace: str, name: str, port: str) -> str:
    """`namespace/name:port`, the readable name of a service port."""
    return f"{namespace}/{name}:{port}"


def hostport(address: str, port: int) -> str:
    """`ip:port`, with brackets around IPv6 addresses."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def address_key(address: str) -> tuple[int, int]:
    """Sort key of an address or network: family, then numeric value."""
    # A plain address (every frontend and backend) is read in C; anything else, such
    # as a network, through ipaddress. Both give the same key for a plain address.
    try:
        if ":" in address:
            return 6, int.from_bytes(socket.inet_pton(socket.AF_INET6, address))
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, address))
    except (OSError, ValueError):
        ip = ipaddress.ip_network(address, strict=False)
        return ip.version, int(ip.network_address)

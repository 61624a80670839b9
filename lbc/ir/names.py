"""Stable names derived from content, never from list positions."""

from __future__ import annotations

import base64
import hashlib


def digest(text: str, length: int = 16) -> str:
    """The first `length` base32 characters of sha256(text): upper case, A-Z and 2-7."""
    raw = hashlib.sha256(text.encode()).digest()
    return base64.b32encode(raw)[:length].decode()


def service_port_name(namespace: str, name: str, port: str) -> str:
    """`namespace/name:port`, the readable name of a service port."""
    return f"{namespace}/{name}:{port}"


def hostport(address: str, port: int) -> str:
    """`ip:port`, with brackets around IPv6 addresses."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"

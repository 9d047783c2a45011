"""Addresses a request names, checked against what the server's config allows.

- :func:`is_loopback_host`: ``localhost``, 127.0.0.0/8, ::1 (``0.0.0.0`` / ``::`` are not).
- :func:`parse_address`: ``host:port`` / ``[v6]:port`` or INVALID_ARGUMENT naming the field.
- :func:`address_allowed`: loopback only by default, else an allow-list of IPs, CIDRs, host
  names (not resolved) and ``host:port``; PERMISSION_DENIED naming the field otherwise.
- :func:`validate_allow_list`: the config side of it.
"""

from __future__ import annotations

import ipaddress
import re

from covrl.services.errors import InvalidArgument, PermissionDenied


def is_loopback_host(host: str) -> bool:
    """``localhost``, 127.0.0.0/8 or ::1 (with or without brackets); 0.0.0.0 / :: are not."""
    host = (host or "").strip().lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


_HOST_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})")


def parse_address(address: str, field: str = "address") -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host without brackets, port); InvalidArgument otherwise."""
    if not isinstance(address, str) or len(address) > 300:
        raise InvalidArgument(field, "must be host:port (at most 300 characters)")
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^\s:\[\]]+):(\d{1,5})", address)
    if not m:
        raise InvalidArgument(field, f"must be host:port or [v6]:port, got {address[:80]!r}")
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    if m.group(1):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidArgument(field, f"{host[:80]!r} is not an IPv6 address") from None
    elif not _HOST_RE.fullmatch(host):
        raise InvalidArgument(field, f"host {host[:80]!r} is not a host name or IPv4 address")
    if not 1 <= int(port) <= 65535:
        raise InvalidArgument(field, f"port must be in 1..65535, got {port}")
    return host, int(port)


def address_allowed(address: str, allowed: list[str] | None, field: str = "address") -> str:
    """Return ``address`` when its host is allowed, else raise.

    ``allowed`` None or empty: loopback only. Otherwise entries are IP addresses, CIDR
    networks (``10.0.0.0/24``), host names (matched exactly, case-insensitive, not
    resolved) or ``host:port`` (that port only). Malformed -> InvalidArgument, not allowed
    -> PermissionDenied, both naming ``field``.
    """
    host, port = parse_address(address, field)
    if not allowed:
        if is_loopback_host(host):
            return address
        raise PermissionDenied(field, f"{host!r} is not loopback, and the server allows only loopback "
                                      "addresses (configure an allow-list to open it)")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    for entry in allowed:
        entry = str(entry).strip()
        if ip is not None and "/" in entry:
            if ip in ipaddress.ip_network(entry, strict=False):
                return address
            continue
        e_host, e_port = _split_entry(entry)
        if e_port is not None and e_port != port:
            continue
        if ip is not None:
            try:
                if ip == ipaddress.ip_address(e_host):
                    return address
            except ValueError:
                pass
        elif e_host == host.lower():
            return address
    raise PermissionDenied(field, f"{address!r} is not in the server's allow-list")


def _split_entry(entry: str) -> tuple[str, int | None]:
    """An allow-list entry -> (lower-case host without brackets, port or None)."""
    m = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?|([^:]+):(\d+)", entry)
    if m is None:  # a bare host, IPv4 or IPv6 address
        return entry.lower(), None
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    return host.lower(), int(port) if port else None


def validate_allow_list(allowed, key: str) -> list[str]:
    """Check a configured allow-list (strings; CIDRs must parse); returns it as a list."""
    if allowed is None:
        return []
    if isinstance(allowed, str) or not isinstance(allowed, list | tuple):
        raise ValueError(f"{key}: expected a list of hosts, IPs, CIDRs or host:port, got {allowed!r}")
    out = []
    for i, entry in enumerate(allowed):
        if not isinstance(entry, str) or not entry.strip():
            raise ValueError(f"{key}[{i}]: expected a non-empty string, got {entry!r}")
        if "/" in entry:
            try:
                ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError as e:
                raise ValueError(f"{key}[{i}]: {e}") from None
        out.append(entry.strip())
    return out

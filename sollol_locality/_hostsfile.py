"""The hosts file format (``/etc/hosts``), shared by :mod:`local` and :mod:`resolver`.

Each line is an address followed by names; ``#`` starts a comment. Addresses are unwrapped
(IPv4-mapped IPv6 to IPv4, zone ids dropped) and names normalised (lower case, no trailing dot),
the forms the rest of the package compares.
"""

from __future__ import annotations

import ipaddress

from .addresses import IPAddress

__all__ = ["normalise_name", "parse_hosts_entries", "unwrap_ip"]


def unwrap_ip(ip: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 to IPv4; a zone id (scope) dropped."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.scope_id is not None:
            return ipaddress.IPv6Address(int(ip))
    return ip


def normalise_name(name: str) -> str:
    """Lower case, surrounding space and one trailing dot removed."""
    name = name.strip().lower()
    return name[:-1] if name.endswith(".") else name


def parse_hosts_entries(text: str) -> list[tuple[IPAddress, list[str]]]:
    """``(address, names)`` for each usable line of hosts-file text, in file order."""
    entries: list[tuple[IPAddress, list[str]]] = []
    for line in text.splitlines():
        fields = line.partition("#")[0].split()
        if len(fields) < 2:
            continue
        try:
            ip = unwrap_ip(ipaddress.ip_address(fields[0].partition("%")[0]))
        except ValueError:
            continue
        entries.append((ip, [normalise_name(name) for name in fields[1:]]))
    return entries

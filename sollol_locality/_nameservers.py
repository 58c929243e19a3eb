"""DNS server addresses: :class:`Nameserver` and :func:`parse_nameserver` (layer 1).

Shared by :mod:`sollol_locality.config` (the ``nameservers`` setting) and
:mod:`sollol_locality.resolver`; imports nothing but :mod:`_errors` and :mod:`addresses`.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from ._errors import ConfigError
from .addresses import IPAddress

__all__ = ["Nameserver", "parse_nameserver", "parse_nameservers"]


@dataclass(frozen=True, slots=True)
class Nameserver:
    """A DNS server to send queries to."""

    ip: IPAddress
    port: int = 53
    zone: str | None = None

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET if self.ip.version == 4 else socket.AF_INET6

    @property
    def sockaddr(self) -> tuple[str, int]:
        """The address to give ``sendto`` / ``connect`` (the zone id kept on the host)."""
        host = str(self.ip)
        return (f"{host}%{self.zone}" if self.zone else host, self.port)

    def __str__(self) -> str:
        if self.ip.version == 6:
            zone = f"%{self.zone}" if self.zone else ""
            return f"[{self.ip}{zone}]:{self.port}"
        return f"{self.ip}:{self.port}"


def parse_nameserver(text: str) -> Nameserver:
    """Parse ``"ip"``, ``"ip:port"``, ``"[ipv6]"`` or ``"[ipv6]:port"`` (IPv6 may carry ``%zone``).

    Raises:
        ConfigError: not an IP address with an optional port; the message names the value.
    """
    if not isinstance(text, str):
        raise ConfigError(
            f"Invalid nameserver {text!r}: expected a string", variable="nameservers", value=text
        )
    value = text.strip()
    host, port_text = value, None
    if value.startswith("["):
        close = value.find("]")
        host, rest = value[1:close], value[close + 1:]
        if close == -1 or (rest and not rest.startswith(":")):
            raise _bad_nameserver(text)
        port_text = rest[1:] if rest else None
    elif value.count(":") == 1:
        host, _, port_text = value.partition(":")
    host, _, zone = host.partition("%")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise _bad_nameserver(text) from None
    if zone and ip.version != 6:
        raise _bad_nameserver(text)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    port = 53
    if port_text is not None:
        if not (port_text.isascii() and port_text.isdigit() and 1 <= int(port_text) <= 65535):
            raise _bad_nameserver(text)
        port = int(port_text)
    return Nameserver(ip, port, zone or None)


def parse_nameservers(value: Sequence[str] | str) -> tuple[Nameserver, ...]:
    """A list of servers (or one comma-separated string), duplicates dropped, order kept.

    Raises:
        ConfigError: an entry is not a nameserver, or there is none.
    """
    items = value.split(",") if isinstance(value, str) else list(value)
    parsed = tuple(dict.fromkeys(parse_nameserver(item) for item in items))
    if not parsed:
        raise ConfigError(
            "Invalid nameservers []: expected at least one nameserver",
            variable="nameservers",
            value=value,
        )
    return parsed


def _bad_nameserver(text: str) -> ConfigError:
    return ConfigError(
        f"Invalid nameserver {text!r}: expected an IP address, ip:port or [ipv6]:port "
        "(port 1 to 65535)",
        variable="nameservers",
        value=text,
    )

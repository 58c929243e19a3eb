"""Parsing every node shape into a normalised :class:`NodeAddress`.

Accepted shapes (every place that takes a node accepts all of them):

* a string: ``"http://host:11434"``, ``"https://host"``, ``"host:11434"``, ``"host"``,
  ``"[::1]:11434"``, ``"http://[fe80::1%eth0]:11434"``;
* a mapping: ``{"url": ...}`` or ``{"host": ..., "port": ...}`` (port may be ``str`` or ``int``);
* an object with ``.url``, or with ``.host`` and ``.port``.

Parsing is pure code: one small function per component, IP literals handed to :mod:`ipaddress`.
Host names are lower-cased, a trailing dot is removed and internationalised names are encoded to
IDNA (A-labels). With no scheme the scheme is ``http`` and, with no port, the port is 11434, as the
official ``ollama`` client does. Credentials in a URL are dropped: they never reach a
:class:`NodeAddress`, its ``repr``, a log line or an exception message.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Final, Protocol, runtime_checkable

from ._errors import InvalidNodeAddress
from ._nodefields import safe_getattr as _safe_getattr

__all__ = [
    "DEFAULT_PORT",
    "IPAddress",
    "NodeAddress",
    "describe_input",
    "node_reference",
    "parse_node_address",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_PORT: Final = 11434
"""Ollama's port, used when a node gives none."""

_SCHEMES: Final = frozenset({"http", "https"})
_MAX_INPUT: Final = 2048
_MAX_NAME: Final = 253
_MAX_LABEL: Final = 63
_SCHEME_RE: Final = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_LABEL_RE: Final = re.compile(r"^[a-z0-9_](?:[a-z0-9_\-]*[a-z0-9_])?$")
_NUMERIC_HOST_RE: Final = re.compile(r"^[0-9.]+$|^0[xX][0-9a-fA-F]+$")
_ZONE_RE: Final = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_BAD_CHARS_RE: Final = re.compile(r"[\s\x00-\x1f\x7f]")
# Everything up to the *last* "@" of the authority: a password may itself contain "@".
_USERINFO_RE: Final = re.compile(r"(?<=//)[^/?#]*@|^[^/?#]*@")
_QUERY_RE: Final = re.compile(r"([?#]).*", re.DOTALL)  # may carry a token (?key=...)


@runtime_checkable
class NodeWithURL(Protocol):
    """A node object that carries its address as ``.url`` (SOLLOL, SynapticLlamas)."""

    url: str


@dataclass(frozen=True, slots=True)
class NodeAddress:
    """A node's address in normalised form. Compares and hashes by that form.

    Attributes:
        scheme: ``"http"`` or ``"https"``.
        host: lower-case host name (IDNA A-labels, no trailing dot) or the compressed text of an
            IP literal (IPv6 without brackets or zone).
        port: TCP port, 1 to 65535.
        zone: IPv6 zone id (``"eth0"`` of ``fe80::1%eth0``), else ``None``.
        path: the URL path without query or fragment (``""`` when none); not part of identity.
        ip: the IP address the host denotes, IPv4-mapped IPv6 unwrapped to IPv4; ``None`` for names.
    """

    scheme: str
    host: str
    port: int
    zone: str | None = None
    path: str = field(default="", compare=False)
    ip: IPAddress | None = field(default=None, compare=False, repr=False)

    @property
    def is_ip(self) -> bool:
        """Whether the host is an IP literal rather than a name."""
        return self.ip is not None

    @property
    def netloc(self) -> str:
        """``host:port`` with brackets (and ``%25zone``) around IPv6 literals."""
        host = self.host
        if ":" in host:
            host = f"[{host}%25{self.zone}]" if self.zone else f"[{host}]"
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """The normalised URL, ``scheme://host:port`` (never any credentials or path)."""
        return f"{self.scheme}://{self.netloc}"

    def __str__(self) -> str:
        return self.url


def describe_input(node: object, limit: int = 80) -> str:
    """A safe ``repr`` of a node for messages: credentials (userinfo, query, fragment) masked,
    long input shortened."""
    if isinstance(node, str):
        text = _mask(node)
    elif isinstance(node, Mapping):
        url = node.get("url")
        if isinstance(url, str):
            text = _mask(url)
        else:
            return f"<mapping with keys {sorted(map(str, node.keys()))[:6]!r}>"
    else:
        url = _safe_getattr(node, "url")
        if isinstance(url, str):
            text = _mask(url)
        else:
            return f"<{type(node).__name__} object>"
    if len(text) > limit:
        return repr(text[:limit]) + f"...({len(text)} characters)"
    return repr(text)


def _mask(text: str) -> str:
    """``text`` with its userinfo and its query and fragment masked."""
    return _QUERY_RE.sub(r"\1***", _USERINFO_RE.sub("***@", text))


def _describe_scalar(node: object, limit: int = 80) -> str:
    """``repr`` of None, a number or bytes for messages: credentials in bytes masked, long input
    shortened, and never an error (an int too long for ``repr`` is described by its size)."""
    if isinstance(node, bytes):
        return "b" + describe_input(node.decode("ascii", "backslashreplace"), limit)
    try:
        text = repr(node)
    except ValueError:  # more digits than sys.get_int_max_str_digits() allows
        bits = node.bit_length() if isinstance(node, int) else 0
        return f"<{type(node).__name__} of {bits} bits>"
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} characters)"


def node_reference(node: object) -> str | None:
    """The address text a node carries (its URL, or ``host:port``), without parsing it.

    Used as a cheap cache key; ``None`` when the node has no recognisable address.
    """
    if isinstance(node, str):
        return node
    if isinstance(node, Mapping):
        url = node.get("url")
        if url is not None:
            return url if isinstance(url, str) else None
        host, port = node.get("host"), node.get("port")
        return None if host is None else f"{host}\x00{port}"
    url = _safe_getattr(node, "url")
    if isinstance(url, str):
        return url
    host = _safe_getattr(node, "host")
    if isinstance(host, str):
        return f"{host}\x00{_safe_getattr(node, 'port')}"
    return None


def parse_node_address(node: object, *, default_port: int = DEFAULT_PORT) -> NodeAddress:
    """Parse any accepted node shape into a :class:`NodeAddress`.

    Raises:
        InvalidNodeAddress: the input names no usable host and port; the message names the input
            (credentials masked) and the reason.
    """
    if isinstance(node, str):
        return _parse_string(node, default_port)
    if isinstance(node, Mapping):
        return _parse_mapping(node, default_port)
    if node is None or isinstance(node, (bytes, int, float, bool)):
        raise InvalidNodeAddress(
            _describe_scalar(node),
            f"expected a URL string, mapping or node object, got {type(node).__name__}",
        )
    try:
        url = getattr(node, "url", None)
    except Exception as exc:
        raise InvalidNodeAddress(
            describe_input(node), f"reading .url raised {type(exc).__name__}"
        ) from exc
    if url is not None:
        if not isinstance(url, str):
            raise InvalidNodeAddress(
                describe_input(node), f".url must be a string, got {type(url).__name__}"
            )
        return _parse_string(url, default_port)
    try:
        host = getattr(node, "host", None)
        port = getattr(node, "port", None)
    except Exception as exc:
        raise InvalidNodeAddress(
            describe_input(node), f"reading .host/.port raised {type(exc).__name__}"
        ) from exc
    if host is None:
        raise InvalidNodeAddress(
            describe_input(node), "expected a .url attribute or .host and .port attributes"
        )
    return _from_components(describe_input(node), "http", host, port, default_port)


def _parse_mapping(node: Mapping[Any, Any], default_port: int) -> NodeAddress:
    if "url" in node:
        url = node["url"]
        if not isinstance(url, str):
            raise InvalidNodeAddress(
                describe_input(node), f"'url' must be a string, got {type(url).__name__}"
            )
        return _parse_string(url, default_port)
    if "host" not in node:
        raise InvalidNodeAddress(describe_input(node), "expected a 'url' key or a 'host' key")
    scheme = node.get("scheme", "http")
    return _from_components(
        describe_input(node), scheme, node["host"], node.get("port"), default_port
    )


def _from_components(
    shown: str, scheme: object, host: object, port: object, default_port: int
) -> NodeAddress:
    if not isinstance(scheme, str) or scheme.lower() not in _SCHEMES:
        raise InvalidNodeAddress(shown, f"unsupported scheme {scheme!r} (expected http or https)")
    if not isinstance(host, str):
        raise InvalidNodeAddress(shown, f"host must be a string, got {type(host).__name__}")
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if "://" in host or "/" in host or "@" in host:
        # A full URL given as the host: parse it, its own port wins unless one is given.
        parsed = _parse_string(host, default_port)
        if port in (None, ""):
            return parsed
        return NodeAddress(
            parsed.scheme, parsed.host, _parse_port(shown, port), parsed.zone, parsed.path,
            parsed.ip,
        )
    host_part, zone = _split_zone(shown, host)
    resolved_port = default_port if port is None or port == "" else _parse_port(shown, port)
    return _build(shown, scheme.lower(), host_part, zone, resolved_port, "")


@lru_cache(maxsize=65536)
def _parse_string(text: str, default_port: int) -> NodeAddress:
    shown = describe_input(text)
    if len(text) > _MAX_INPUT:
        raise InvalidNodeAddress(shown, f"longer than {_MAX_INPUT} characters")
    text = text.strip()
    if not text:
        raise InvalidNodeAddress(shown, "empty address")
    if _BAD_CHARS_RE.search(text):
        raise InvalidNodeAddress(shown, "contains white space or control characters")
    scheme, rest = _split_scheme(shown, text)
    authority, path = _split_authority(rest)
    if "@" in authority:
        authority = authority.rpartition("@")[2]  # credentials are dropped, never stored
    if not authority:
        raise InvalidNodeAddress(shown, "no host")
    host, zone, port_text = _split_host_port(shown, authority)
    port = default_port if port_text is None else _parse_port(shown, port_text)
    return _build(shown, scheme, host, zone, port, path)


def _split_scheme(shown: str, text: str) -> tuple[str, str]:
    match = _SCHEME_RE.match(text)
    if match is None:
        if "://" in text:
            raise InvalidNodeAddress(shown, "malformed scheme")
        return "http", text
    scheme = match.group(1).lower()
    if scheme not in _SCHEMES:
        raise InvalidNodeAddress(shown, f"unsupported scheme {scheme!r} (expected http or https)")
    return scheme, text[match.end():]


def _split_authority(rest: str) -> tuple[str, str]:
    end = len(rest)
    for sep in "/?#":
        idx = rest.find(sep)
        if idx != -1 and idx < end:
            end = idx
    authority, tail = rest[:end], rest[end:]
    path = tail.split("?", 1)[0].split("#", 1)[0]
    return authority, path.rstrip("/")


def _split_host_port(shown: str, authority: str) -> tuple[str, str | None, str | None]:
    if authority.startswith("["):
        close = authority.find("]")
        if close == -1:
            raise InvalidNodeAddress(shown, "unclosed '[' in IPv6 address")
        inner, after = authority[1:close], authority[close + 1:]
        if after and not after.startswith(":"):
            raise InvalidNodeAddress(shown, f"unexpected {after!r} after IPv6 address")
        host, zone = _split_zone(shown, inner)
        if ":" not in host:
            raise InvalidNodeAddress(shown, f"{host!r} in brackets is not an IPv6 address")
        return host, zone, (after[1:] if after else None)
    if authority.count(":") > 1:
        # A bare IPv6 literal without brackets ("::1", "fe80::1%eth0") carries no port.
        host, zone = _split_zone(shown, authority)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidNodeAddress(
                shown, "IPv6 addresses with a port must be in brackets, as in [::1]:11434"
            ) from None
        return host, zone, None
    host, sep, port = authority.partition(":")
    if "%" in host:
        raise InvalidNodeAddress(shown, "a zone id is only valid on an IPv6 address")
    return host, None, (port if sep else None)


def _split_zone(shown: str, host: str) -> tuple[str, str | None]:
    if "%" not in host:
        return host, None
    host, _, zone = host.partition("%")
    if zone.startswith("25") and len(zone) > 2:
        zone = zone[2:]  # RFC 6874 writes the '%' of a zone id as '%25'
    if not _ZONE_RE.match(zone):
        raise InvalidNodeAddress(shown, f"invalid IPv6 zone id {zone!r}")
    return host, zone


def _parse_port(shown: str, port: object) -> int:
    if isinstance(port, bool):
        raise InvalidNodeAddress(shown, f"invalid port {port!r}")
    if isinstance(port, int):
        value = port
    elif isinstance(port, str) and port.strip().isdigit() and port.strip().isascii():
        value = int(port.strip())
    else:
        raise InvalidNodeAddress(shown, f"invalid port {port!r} (expected 1 to 65535)")
    if not 1 <= value <= 65535:
        raise InvalidNodeAddress(shown, f"invalid port {port!r} (expected 1 to 65535)")
    return value


def _build(
    shown: str, scheme: str, host: str, zone: str | None, port: int, path: str
) -> NodeAddress:
    if not host:
        raise InvalidNodeAddress(shown, "no host")
    ip = _parse_ip(shown, host)
    if ip is not None:
        if ip.version == 4 and zone is not None:
            raise InvalidNodeAddress(shown, "a zone id is only valid on an IPv6 address")
        mapped = ip.ipv4_mapped if ip.version == 6 else None
        text = f"::ffff:{mapped}" if mapped is not None else ip.compressed
        return NodeAddress(scheme, text, port, zone, path, mapped or ip)
    if zone is not None:
        raise InvalidNodeAddress(shown, "a zone id is only valid on an IPv6 address")
    name = _normalise_name(shown, host)
    if not host.isascii() and _NUMERIC_HOST_RE.match(name):
        # IDNA mapped it to digits ("１２７.０.０.１", "¹"): an address, as if typed in ASCII.
        ip = _parse_ip(shown, name)
        assert ip is not None
        return NodeAddress(scheme, ip.compressed, port, None, path, ip)
    return NodeAddress(scheme, name, port, None, path, None)


def _parse_ip(shown: str, host: str) -> IPAddress | None:
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidNodeAddress(shown, f"{host!r} is not a valid IPv6 address") from None
    if _NUMERIC_HOST_RE.match(host):
        # Numeric hosts follow inet_aton, as browsers and gethostbyname do: 127.1 is 127.0.0.1.
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            raise InvalidNodeAddress(shown, f"{host!r} is not a valid IPv4 address") from None
    return None


def _normalise_name(shown: str, host: str) -> str:
    name = host.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise InvalidNodeAddress(shown, "no host")
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise InvalidNodeAddress(
                shown, "not a valid internationalised domain name"
            ) from None
    if len(name) > _MAX_NAME:
        raise InvalidNodeAddress(shown, f"host name longer than {_MAX_NAME} characters")
    for label in name.split("."):
        if not label:
            raise InvalidNodeAddress(shown, "empty label in host name")
        if len(label) > _MAX_LABEL:
            raise InvalidNodeAddress(shown, f"label longer than {_MAX_LABEL} characters")
        if not _LABEL_RE.match(label):
            raise InvalidNodeAddress(shown, f"invalid character in host name label {label!r}")
    return name

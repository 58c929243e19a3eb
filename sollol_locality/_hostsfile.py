"""The hosts file (``/etc/hosts``): its format and one cached reader per path (layer 1).

Shared by :mod:`local` (this machine's names) and :mod:`resolver` (names answered without DNS).
Each line is an address followed by names; ``#`` starts a comment. Addresses are unwrapped
(IPv4-mapped IPv6 to IPv4, zone ids dropped) and names normalised (lower case, no trailing dot),
the forms the rest of the package compares.

:func:`hosts_file` gives the one :class:`HostsFile` of a path, so both sides read and cache the
file once; it is re-read when its mtime, size or inode changes.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from typing import Final

from .addresses import IPAddress

__all__ = [
    "HostsFile",
    "hosts_file",
    "normalise_name",
    "parse_hosts",
    "parse_hosts_entries",
    "unwrap_ip",
]

logger = logging.getLogger(__name__)

MAX_SIZE: Final = 16 * 1024 * 1024  # characters read at most; the rest of a huge file is ignored


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


def parse_hosts(text: str) -> dict[str, frozenset[IPAddress]]:
    """Names (lower case, no trailing dot) to addresses, from hosts-file text."""
    names: dict[str, set[IPAddress]] = {}
    for ip, aliases in parse_hosts_entries(text):
        for alias in aliases:
            names.setdefault(alias, set()).add(ip)
    return {name: frozenset(ips) for name, ips in names.items()}


class HostsFile:
    """One hosts file, parsed once and re-read only when it changes on disk.

    :meth:`entries` and :meth:`names` check the file's ``stat`` (one system call) and re-read it
    when its mtime, size or inode differ from the last read; :meth:`peek_names` does no I/O. A
    missing or unreadable file reads as empty. Thread-safe.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._signature: tuple[int, int, int] | None = None
        self._entries: list[tuple[IPAddress, list[str]]] | None = None
        self._names: dict[str, frozenset[IPAddress]] | None = None

    def entries(self) -> list[tuple[IPAddress, list[str]]]:
        """``(address, names)`` per usable line, in file order (see :func:`parse_hosts_entries`)."""
        with self._lock:
            self._reload_if_changed()
            assert self._entries is not None
            return self._entries

    def names(self) -> dict[str, frozenset[IPAddress]]:
        """Name to addresses (see :func:`parse_hosts`); do not modify the result."""
        with self._lock:
            self._reload_if_changed()
            assert self._names is not None
            return self._names

    def peek_names(self) -> dict[str, frozenset[IPAddress]] | None:
        """What the last read found, without I/O; ``None`` before the first read."""
        with self._lock:
            return self._names

    def _reload_if_changed(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            if self._entries is None or self._signature is not None:
                logger.debug("hosts file %r not read: %s", self.path, exc,
                             extra={"event": "hosts_file_unread"})
            self._set([], None)
            return
        signature = (st.st_mtime_ns, st.st_size, st.st_ino)
        if self._entries is not None and signature == self._signature:
            return
        try:
            with open(self.path, encoding="utf-8", errors="replace") as handle:
                text = handle.read(MAX_SIZE)
        except OSError as exc:
            logger.debug("hosts file %r not read: %s", self.path, exc,
                         extra={"event": "hosts_file_unread"})
            self._set([], None)
            return
        self._set(parse_hosts_entries(text), signature)
        logger.debug("read %d lines from hosts file %r", len(self._entries or ()), self.path)

    def _set(
        self, entries: list[tuple[IPAddress, list[str]]], signature: tuple[int, int, int] | None
    ) -> None:
        names: dict[str, set[IPAddress]] = {}
        for ip, aliases in entries:
            for alias in aliases:
                names.setdefault(alias, set()).add(ip)
        self._entries, self._signature = entries, signature
        self._names = {name: frozenset(ips) for name, ips in names.items()}


_READERS: dict[str, HostsFile] = {}
_READERS_LOCK = threading.Lock()


def hosts_file(path: str | os.PathLike[str]) -> HostsFile:
    """The process-wide :class:`HostsFile` of ``path`` (one cache per file, shared)."""
    key = os.path.abspath(os.fspath(path))
    with _READERS_LOCK:
        reader = _READERS.get(key)
        if reader is None:
            reader = _READERS[key] = HostsFile(key)
        return reader

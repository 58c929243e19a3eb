"""Shared fixtures. Each block is self-contained; append new fixtures below."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sollol_locality.testing.dnsserver import DnsTestServer

# -- DNS: loopback test servers (tests never send a packet off this machine) ----------------------


@pytest.fixture
def make_dns_server() -> Iterator[Callable[..., DnsTestServer]]:
    """A factory of started loopback DNS servers: ``make_dns_server(zones, host=..., ...)``.

    Every server made is stopped (thread joined, sockets closed) after the test.
    """
    servers: list[DnsTestServer] = []

    def make(zones: dict[str, Any] | None = None, **options: Any) -> DnsTestServer:
        server = DnsTestServer(zones, **options).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()
    errors = [error for server in servers for error in server.errors]
    assert not errors, f"the DNS test server failed: {errors!r}"


@pytest.fixture
def dns_server(make_dns_server: Callable[..., DnsTestServer]) -> DnsTestServer:
    """A started loopback DNS server with no zones yet (``dns_server.set_zones({...})``)."""
    return make_dns_server()

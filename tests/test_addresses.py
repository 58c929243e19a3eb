"""addresses: every node shape into a NodeAddress, and clear errors for the rest."""

from __future__ import annotations

import ipaddress
from dataclasses import FrozenInstanceError
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sollol_locality import InvalidNodeAddress, NodeAddress, parse_node_address
from sollol_locality.addresses import describe_input


@pytest.mark.parametrize(
    ("node", "scheme", "host", "port", "zone"),
    [
        ("http://host:11434", "http", "host", 11434, None),
        ("https://host", "https", "host", 11434, None),
        ("host:11434", "http", "host", 11434, None),
        ("host", "http", "host", 11434, None),
        ("HOST.Example.COM.", "http", "host.example.com", 11434, None),
        ("http://host:11434/", "http", "host", 11434, None),
        ("http://host:11434/api/generate?x=1#frag", "http", "host", 11434, None),
        ("  http://host:8080  ", "http", "host", 8080, None),
        ("[::1]:11434", "http", "::1", 11434, None),
        ("[::1]", "http", "::1", 11434, None),
        ("::1", "http", "::1", 11434, None),
        ("http://[fe80::1%eth0]:11434", "http", "fe80::1", 11434, "eth0"),
        ("http://[fe80::1%25eth0]:11434", "http", "fe80::1", 11434, "eth0"),
        ("http://[2001:DB8::0:1]:1", "http", "2001:db8::1", 1, None),
        ("[::ffff:127.0.0.1]:11434", "http", "::ffff:127.0.0.1", 11434, None),
        ("127.1", "http", "127.0.0.1", 11434, None),
        ("0.0.0.0:11435", "http", "0.0.0.0", 11435, None),
        ("bücher.example:80", "http", "xn--bcher-kva.example", 80, None),
        ("http://user:pass@host:11434", "http", "host", 11434, None),
        ("my_host.local", "http", "my_host.local", 11434, None),
        ({"url": "http://h:1"}, "http", "h", 1, None),
        ({"host": "h", "port": "11435"}, "http", "h", 11435, None),
        ({"host": "h", "port": 11435}, "http", "h", 11435, None),
        ({"host": "h"}, "http", "h", 11434, None),
        ({"host": "[::1]", "port": "11434"}, "http", "::1", 11434, None),
        ({"host": "::1", "port": 7}, "http", "::1", 7, None),
        ({"host": "h", "port": 5, "scheme": "https"}, "https", "h", 5, None),
        (SimpleNamespace(url="http://h:2"), "http", "h", 2, None),
        (SimpleNamespace(host="h", port=3), "http", "h", 3, None),
        (SimpleNamespace(host="h", port="4"), "http", "h", 4, None),
    ],
)
def test_parses_every_documented_shape(node, scheme, host, port, zone):
    address = parse_node_address(node)
    assert (address.scheme, address.host, address.port, address.zone) == (scheme, host, port, zone)


def test_ip_is_unwrapped_for_ipv4_mapped_addresses():
    assert parse_node_address("[::ffff:127.0.0.1]").ip == ipaddress.ip_address("127.0.0.1")
    assert parse_node_address("10.0.0.1").ip == ipaddress.ip_address("10.0.0.1")
    assert parse_node_address("name").ip is None


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ("", "Invalid node address '': empty address"),
        ("   ", "Invalid node address '   ': empty address"),
        ("host:abc", "Invalid node address 'host:abc': invalid port 'abc' (expected 1 to 65535)"),
        ("host:0", "Invalid node address 'host:0': invalid port '0' (expected 1 to 65535)"),
        ("host:65536",
         "Invalid node address 'host:65536': invalid port '65536' (expected 1 to 65535)"),
        ("host:-1", "Invalid node address 'host:-1': invalid port '-1' (expected 1 to 65535)"),
        ("ftp://host", "Invalid node address 'ftp://host': unsupported scheme 'ftp' "
                       "(expected http or https)"),
        ("a..b", "Invalid node address 'a..b': empty label in host name"),
        ("999.1.1.1", "Invalid node address '999.1.1.1': '999.1.1.1' is not a valid IPv4 address"),
        ("fe80::1:11434", "Invalid node address 'fe80::1:11434': IPv6 addresses with a port "
                          "must be in brackets, as in [::1]:11434"),
        ("[::1", "Invalid node address '[::1': unclosed '[' in IPv6 address"),
        ("[nothex]:1",
         "Invalid node address '[nothex]:1': 'nothex' in brackets is not an IPv6 address"),
        ("host%eth0",
         "Invalid node address 'host%eth0': a zone id is only valid on an IPv6 address"),
        ("ho st", "Invalid node address 'ho st': contains white space or control characters"),
        ("http://", "Invalid node address 'http://': no host"),
        ("http://u:secret@h:99999",
         "Invalid node address 'http://***@h:99999': invalid port '99999' (expected 1 to 65535)"),
        (None, "Invalid node address None: expected a URL string, mapping or node object, "
               "got NoneType"),
        (42, "Invalid node address 42: expected a URL string, mapping or node object, got int"),
        ({"port": 1}, "Invalid node address <mapping with keys ['port']>: expected a 'url' key "
                      "or a 'host' key"),
        ({"url": 5}, "Invalid node address <mapping with keys ['url']>: 'url' must be a string, "
                     "got int"),
        (SimpleNamespace(), "Invalid node address <SimpleNamespace object>: expected a .url "
                            "attribute or .host and .port attributes"),
    ],
)
def test_invalid_input_names_input_and_reason(node, message):
    with pytest.raises(InvalidNodeAddress) as info:
        parse_node_address(node)
    assert str(info.value) == message
    assert isinstance(info.value, ValueError)


def test_object_whose_url_raises_is_invalid_not_a_crash():
    class Broken:
        @property
        def url(self) -> str:
            raise RuntimeError("boom")

    with pytest.raises(InvalidNodeAddress, match=r"reading \.url raised RuntimeError"):
        parse_node_address(Broken())


def test_long_and_over_long_names():
    label = "a" * 63
    assert parse_node_address(f"{label}.example").host == f"{label}.example"
    with pytest.raises(InvalidNodeAddress, match="label longer than 63 characters"):
        parse_node_address("a" * 64 + ".example")
    with pytest.raises(InvalidNodeAddress, match="longer than 2048 characters"):
        parse_node_address("a" * 10_000)
    with pytest.raises(InvalidNodeAddress, match=r"\.\.\.\(10000 characters\)"):
        parse_node_address("a" * 10_000)


def test_credentials_never_reach_the_address_or_its_repr():
    address = parse_node_address("https://alice:hunter2@host:11434/x")
    assert "hunter2" not in repr(address)
    assert "alice" not in repr(address)
    assert address.url == "https://host:11434"
    assert "hunter2" not in describe_input("https://alice:hunter2@host:11434/x")


def test_address_is_frozen_and_compares_by_normalised_form():
    a = parse_node_address("HTTP://Host.:11434/")
    b = parse_node_address({"host": "host", "port": "11434"})
    assert a == b and hash(a) == hash(b)
    with pytest.raises(FrozenInstanceError):
        a.port = 1  # type: ignore[misc]


def test_url_brackets_ipv6_and_encodes_zone():
    assert parse_node_address("http://[fe80::1%eth0]:1").url == "http://[fe80::1%25eth0]:1"
    assert parse_node_address("::1").url == "http://[::1]:11434"


_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)


@given(
    labels=st.lists(_label, min_size=0, max_size=3),
    top=st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True),
    port=st.integers(1, 65535),
    scheme=st.sampled_from(["http", "https"]),
)
def test_format_parse_round_trip(labels, top, port, scheme):
    # The last label starts with a letter: an all-numeric name is an IPv4 literal (RFC 1123).
    host = ".".join([*labels, top])
    address = parse_node_address(f"{scheme}://{host}:{port}")
    assert isinstance(address, NodeAddress)
    assert parse_node_address(address.url) == address


@given(ip=st.ip_addresses(), port=st.integers(1, 65535))
def test_ip_literals_round_trip(ip, port):
    text = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
    address = parse_node_address(text)
    assert parse_node_address(address.url) == address
    expected = ip.ipv4_mapped if ip.version == 6 and ip.ipv4_mapped else ip
    assert address.ip == expected


@given(st.text(max_size=300))
def test_any_text_parses_or_raises_invalid_node_address(text):
    try:
        address = parse_node_address(text)
    except InvalidNodeAddress as exc:
        assert exc.reason
    else:
        assert 1 <= address.port <= 65535
        assert address.host

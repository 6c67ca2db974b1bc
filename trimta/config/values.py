"""Value types of the configuration that are written as strings in TOML.

Each parser raises `ValueError` whose message says what is expected; the
loader adds the key path and the offending value in front of it.
"""

from __future__ import annotations

import ipaddress
import re
from typing import NewType

import attrs

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
HOSTNAME_PATTERN = re.compile(
    r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*",
    re.IGNORECASE,
)


@attrs.frozen(order=True)
class Duration:
    """A length of time, in seconds."""

    seconds: float

    def __str__(self) -> str:
        for unit in ("d", "h", "m"):
            size = _UNIT_SECONDS[unit]
            if self.seconds >= size and self.seconds % size == 0:
                return f"{int(self.seconds // size)}{unit}"
        return f"{self.seconds:g}s"


def parse_duration(value: object) -> Duration:
    """Parse "300s", "5m", "4h", "5d", or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError('expected a duration such as "300s", "5m", "4h" or "5d"')
    if isinstance(value, int):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.fullmatch(value)):
        seconds = float(match[1]) * _UNIT_SECONDS[match[2]]
    else:
        raise ValueError(
            'expected a duration such as "300s", "5m", "4h" or "5d", '
            "or a whole number of seconds"
        )
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return Duration(seconds)


@attrs.frozen
class HostPort:
    """A host name or IP address with a TCP port.

    Attributes:
        host: Host name, IP address without brackets, or "*" (any address).
        port: TCP port, 1-65535.
    """

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_host_port(
    value: object, *, default_port: int | None = None, ip_only: bool = False
) -> HostPort:
    """Parse "host:port", "[v6addr]:port", or a bare host with a default port.

    Args:
        value: The TOML value.
        default_port: Port used when none is written; None makes it required.
        ip_only: Accept only IP addresses, "*" and "localhost" as host.

    Raises:
        ValueError: The value is not in one of the accepted forms.
    """
    example = '"127.0.0.1:2525" or "[::1]:2525"'
    if not isinstance(value, str):
        raise ValueError(f'expected a string "host:port", e.g. {example}')
    host, port_text = _split_host_port(value, default_port is not None)
    port = default_port if port_text is None else _parse_port(port_text)
    _check_host(host, ip_only)
    return HostPort(host, port)


def _split_host_port(text: str, port_optional: bool) -> tuple[str, str | None]:
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f'write an IPv6 address as "[{host}]:port"')
        port = rest[1:] if rest else None
    elif text.count(":") > 1:
        raise ValueError('write an IPv6 address in brackets, e.g. "[::1]:2525"')
    else:
        host, colon, port = text.partition(":")
        port = port if colon else None
    if port is None and not port_optional:
        raise ValueError('the port is missing; write it as "host:port", e.g. "[::]:25"')
    return host, port


def _parse_port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(
            'port must be 1-65535; write it as "host:port", e.g. "[::]:25"'
        )
    return int(text)


def _check_host(host: str, ip_only: bool) -> None:
    if host in ("*", "localhost"):
        return
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    if ip_only:
        raise ValueError('host must be an IP address, "*" or "localhost"')
    if not HOSTNAME_PATTERN.fullmatch(host):
        raise ValueError("host must be a host name or an IP address")


def parse_network(value: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """Parse a network in CIDR form; a bare address means that one host."""
    if not isinstance(value, str):
        raise ValueError('expected a network string such as "192.0.2.0/24"')
    try:
        network = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(
            'expected a network such as "127.0.0.1/32" or "2001:db8::/32"'
        ) from None
    if "/" in value and ipaddress.ip_interface(value).ip != network.network_address:
        raise ValueError(
            f'the address has bits set beyond the prefix; write "{network}" '
            "for the whole network, or the address alone for one host"
        )
    return network


# Distinct names for the same value types, so the loader can parse each
# key with the rules that fit it (a listener needs an IP address, a next
# hop may be a host name and defaults to port 25, and so on).
DomainName = NewType("DomainName", str)
LocalPart = NewType("LocalPart", str)
ListenAddress = NewType("ListenAddress", HostPort)
NextHop = NewType("NextHop", HostPort)
RouteKey = NewType("RouteKey", str)
NameserverAddress = NewType("NameserverAddress", HostPort)
Network = NewType("Network", ipaddress.IPv4Network | ipaddress.IPv6Network)

"""The client's address, as far as it can be believed.

`X-Forwarded-For` is only read when the request comes from one of `PORTAL_TRUSTED_PROXIES`
(addresses or networks of reverse proxies, never of clients); then the right-most address that
is not itself a trusted proxy is the client. Everything left of it was written by the client and
is ignored, so a forged header changes nothing: lockout by address and the audit log both rely
on this.

A request whose peer has no IP address (a WSGI server bound to a unix socket gives an empty
`REMOTE_ADDR`) is believed to come from a proxy only when `PORTAL_TRUSTED_UNIX_SOCKET` says so.
Otherwise, or when such a proxy sent no usable `X-Forwarded-For`, the client is unknown, and a
step that counts failures by address refuses to run (`ClientAddressUnknown`): every such client
would share one lockout bucket, so one attacker could lock everybody out, or nobody.
"""

import ipaddress
from functools import lru_cache

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class ClientAddressUnknown(ImproperlyConfigured):
    """The request carries no client address the portal can believe."""


@lru_cache(maxsize=8)
def _trusted_networks(proxies: tuple[str, ...]) -> tuple[_Network, ...]:
    return tuple(ipaddress.ip_network(p.strip(), strict=False) for p in proxies if p.strip())


def _parse(value: str) -> _Address | None:
    try:
        return ipaddress.ip_address(value.strip())
    except ValueError:
        return None


def _is_trusted(address: _Address) -> bool:
    networks = _trusted_networks(tuple(settings.TRUSTED_PROXIES))
    return any(address in network for network in networks)


def _forwarded_client(request: HttpRequest) -> _Address | None:
    """The right-most hop of X-Forwarded-For that is not a trusted proxy; the left-most hop
    when all of them are; None without a usable header."""
    hops = [h for h in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",") if h.strip()]
    client = None
    for hop in reversed(hops):
        address = _parse(hop)
        if address is None:
            # A malformed hop means the chain cannot be believed past this point.
            break
        client = address
        if not _is_trusted(address):
            break
    return client


def from_trusted_proxy(request: HttpRequest) -> bool:
    """Whether the request's peer is one of `PORTAL_TRUSTED_PROXIES` (or the trusted unix
    socket): whether the headers a proxy adds may be believed at all."""
    remote = _parse(request.META.get("REMOTE_ADDR") or "")
    if remote is None:
        return bool(settings.TRUSTED_UNIX_SOCKET)
    return _is_trusted(remote)


def client_ip(request: HttpRequest) -> str | None:
    """The client's address, or None when nothing believable says it."""
    remote = _parse(request.META.get("REMOTE_ADDR") or "")
    if remote is None:
        if not settings.TRUSTED_UNIX_SOCKET:
            return None
        forwarded = _forwarded_client(request)
        return str(forwarded) if forwarded is not None else None
    if not _is_trusted(remote):
        return str(remote)
    forwarded = _forwarded_client(request)
    return str(forwarded if forwarded is not None else remote)


# An IPv6 subscriber gets a whole /64 at least (RFC 6177; RFC 4291 §2.5.4 makes 64-bit interface
# identifiers the rule), and picks any of its 2^64 addresses at will (RFC 8981 temporary
# addresses do it unasked). Counted address by address, one /64 would get unlimited tries.
IPV6_LIMIT_PREFIX = 64


def limit_key(address: str) -> str:
    """What every per-address limit (lockout, captcha, send caps) counts for `address`: the
    address itself for IPv4, its /64 network for IPv6, written as that network's first address
    (`2001:db8:1:2::`) so that it still fits an address column. An IPv4 address mapped into
    IPv6 counts as the IPv4 address. The audit log keeps the full address (`client_ip`)."""
    parsed = _parse(address)
    if parsed is None:
        return address
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        network = ipaddress.IPv6Network((parsed, IPV6_LIMIT_PREFIX), strict=False)
        return str(network.network_address)
    return str(parsed)


def client_limit_key(request: HttpRequest) -> str | None:
    """`limit_key` of the client's address, or None when nothing believable says it."""
    address = client_ip(request)
    return limit_key(address) if address is not None else None


def axes_client_ip(request: HttpRequest) -> str:
    """AXES_CLIENT_IP_CALLABLE: never None, which axes would count as one shared address; for
    IPv6, the client's /64 (`limit_key`)."""
    key = client_limit_key(request)
    if key is None:
        raise ClientAddressUnknown(
            f"Cannot tell the client's address (REMOTE_ADDR={request.META.get('REMOTE_ADDR')!r}). "
            "Behind a reverse proxy on a unix socket, set PORTAL_TRUSTED_UNIX_SOCKET=true and "
            "have the proxy send X-Forwarded-For; otherwise serve the portal on a TCP address."
        )
    return key


def user_agent(request: HttpRequest) -> str:
    return request.META.get("HTTP_USER_AGENT", "")[:255]

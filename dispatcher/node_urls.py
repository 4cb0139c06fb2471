"""What a node may register as: its id and the URL the dispatcher will send requests to.

The dispatcher calls whatever URL a registration names, with the cluster token in the
header, so a registration is a way to make it call somewhere: refuse the places that hand
out cloud credentials (link-local 169.254.0.0/16 and fe80::/10, the metadata addresses
and names) and URLs with a user:password part (credentials that would travel with every
request and show in /v1/nodes), unless the config allows them (`allow_unsafe_node_urls`).
A name that resolves to such an address is not caught here: names are not resolved at
registration.
"""

from __future__ import annotations

import ipaddress

from yarl import URL

METADATA_HOSTS = frozenset({
    "metadata.google.internal", "metadata.goog", "metadata",
    "169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200",
})


def node_id_problem(node_id: str) -> str | None:
    if not node_id:
        return "node_id is empty"
    if any(c.isspace() or not c.isprintable() for c in node_id):
        return f"node_id {node_id!r} has spaces or control characters"
    return None


def _unsafe_ip(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_link_local or str(ip) in METADATA_HOSTS


def node_url_problem(url: str, *, allow_unsafe: bool = False) -> str | None:
    """Why `url` cannot be a node's URL, or None when it can."""
    if not url or any(c.isspace() or not c.isprintable() for c in url):
        return f"inventory.url {url!r} is empty or has spaces or control characters"
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        return f"inventory.url {url!r} is not a URL"
    if parsed.scheme not in ("http", "https") or not parsed.host:
        return f"inventory.url {url!r} must be http(s)://host:port"
    if allow_unsafe:
        return None
    if parsed.user is not None or parsed.password is not None:
        return (f"inventory.url of host {parsed.host!r} has a user:password part; "
                "credentials do not belong in a node URL (allow_unsafe_node_urls to allow)")
    host = parsed.host.lower().rstrip(".")
    if host in METADATA_HOSTS or _unsafe_ip(host):
        return (f"inventory.url host {parsed.host!r} is a link-local or cloud metadata "
                "address (allow_unsafe_node_urls to allow)")
    return None

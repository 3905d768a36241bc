"""Address filters for the firewall role (ansible.utils' ipaddr needs netaddr; these need nothing).

``cidrs | dualtrack_cidrs(4)`` -> the IPv4 networks, normalised; a malformed entry fails the
play naming it. ``addr | dualtrack_in_cidrs(cidrs)`` -> whether the address is in any of them
(the lock-out guard asks this of the operator's own SSH address).
"""

from __future__ import annotations

import ipaddress

from ansible.errors import AnsibleFilterError


def _networks(cidrs: list[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    nets = []
    for cidr in cidrs or []:
        try:
            nets.append(ipaddress.ip_network(str(cidr).strip(), strict=False))
        except ValueError as exc:
            raise AnsibleFilterError(
                f"{cidr!r} is not an IP network (expected e.g. 10.20.0.0/16): {exc}"
            ) from None
    return nets


def dualtrack_cidrs(cidrs: list[str], version: int) -> list[str]:
    return [str(n) for n in _networks(cidrs) if n.version == int(version)]


def dualtrack_in_cidrs(address: str, cidrs: list[str]) -> bool:
    try:
        ip = ipaddress.ip_address(str(address).strip())
    except ValueError:
        return False
    return any(ip in net for net in _networks(cidrs))


class FilterModule:
    def filters(self) -> dict:
        return {"dualtrack_cidrs": dualtrack_cidrs, "dualtrack_in_cidrs": dualtrack_in_cidrs}

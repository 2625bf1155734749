"""ICE host candidates pinned to given addresses (`BATCHRTC_ICE_HOSTS`).

aioice offers every interface but loopback; tests and benchmarks on loopback pin to
`127.0.0.1`. aioice has one process-wide function for it, so this is applied once, when a
stream with the setting builds its WebRTC front end, never at import.
"""

from __future__ import annotations


def pin_ice_hosts(hosts: tuple[str, ...]) -> None:
    if not hosts:
        return
    import aioice.ice

    addrs = list(hosts)
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: list(addrs)

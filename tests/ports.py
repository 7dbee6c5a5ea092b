"""Loopback ports for the Ray clusters tests build by hand (several on one machine at once)."""
from __future__ import annotations

import socket


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on loopback (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def node_ports() -> dict:
    """Explicit ports for one node's agents: the defaults (e.g. 52365) would collide between the
    nodes of one cluster and with other clusters on the machine."""
    agent_http, agent_grpc, metrics, env_agent = free_ports(4)
    return {"dashboard_agent_listen_port": agent_http, "metrics_agent_port": agent_grpc,
            "metrics_export_port": metrics, "runtime_env_agent_port": env_agent}

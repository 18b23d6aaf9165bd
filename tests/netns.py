"""Test hosts for the team tests: Linux network namespaces joined by a bridge, made and
removed by the test that uses them. Their addresses (198.18.0.0/24, RFC 2544's benchmark
range) exist only inside those namespaces: no packet leaves them for any other network.

Commands run on a host with ``ip netns exec`` (:meth:`Network.on`); Python code of the test
process itself can act from a host with :meth:`Network.inside` (``setns`` for the calling
thread, so processes it starts there stay on that host)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

SUBNET = "198.18.0"  # host i gets SUBNET.(i+1)/24
CLONE_NEWNET = 0x40000000


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if done.returncode:
        raise OSError(f"ip {' '.join(args)}: {done.stderr.strip()}")


class Network:
    """Hosts ``names`` on one bridge (in a namespace of its own); ``tag`` keeps the
    namespace names of concurrent test runs apart."""

    def __init__(self, names: list[str], tag: str) -> None:
        self.tag = tag
        self.hosts = {name: f"{tag}-{name}" for name in names}
        self.addresses = {name: f"{SUBNET}.{i + 1}" for i, name in enumerate(names)}
        self.lan = f"{tag}-lan"
        self.made: list[str] = []

    def up(self) -> None:
        """Make every namespace, veth pair and address; raises OSError where not allowed."""
        _ip("netns", "add", self.lan)
        self.made.append(self.lan)
        _ip("-n", self.lan, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.lan, "link", "set", "br0", "up")
        for i, (name, namespace) in enumerate(self.hosts.items()):
            _ip("netns", "add", namespace)
            self.made.append(namespace)
            port = f"v{i}"
            _ip("link", "add", "eth0", "netns", namespace, "type", "veth",
                "peer", "name", port, "netns", self.lan)  # fmt: skip
            _ip("-n", self.lan, "link", "set", port, "master", "br0", "up")
            _ip("-n", namespace, "addr", "add", f"{self.addresses[name]}/24", "dev", "eth0")
            _ip("-n", namespace, "link", "set", "eth0", "up")
            _ip("-n", namespace, "link", "set", "lo", "up")

    def down(self) -> None:
        """Remove every namespace made (the veth pairs go with them)."""
        for namespace in reversed(self.made):
            with contextlib.suppress(OSError):
                _ip("netns", "del", namespace)
        self.made.clear()

    def on(self, host: str) -> list[str]:
        """The prefix that runs a command on ``host``."""
        return ["ip", "netns", "exec", self.hosts[host]]

    @contextlib.contextmanager
    def inside(self, host: str) -> Iterator[None]:
        """This thread on ``host``'s network for the block, then back on its own."""
        libc = ctypes.CDLL(None, use_errno=True)
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(Path("/run/netns") / self.hosts[host], os.O_RDONLY)
        try:
            if libc.setns(target, CLONE_NEWNET):
                raise OSError(ctypes.get_errno(), f"setns into {self.hosts[host]}")
            try:
                yield
            finally:
                if libc.setns(own, CLONE_NEWNET):
                    raise OSError(ctypes.get_errno(), "setns back")
        finally:
            os.close(own)
            os.close(target)

"""A network lab for fault tests: real nats-servers in Linux network namespaces, with partitions.

Layout of one lab (every name carries the run id `<prefix>-<pid>-<seq>`, so runs never collide)::

    root ns (your test process)  nl<pid>x<seq> 10.213.S.254 --+
    <id>-h1   eth0 10.213.S.1 --------------------------------+-- <id>-sw: bridge br0
    <id>-h2   eth0 10.213.S.2 --------------------------------+   (a "switch" namespace)
    ...

The bridge lives in its own namespace; the only thing the lab adds to the root namespace is the
client port (one veth end with an address of the lab's subnet), so the test process reaches every
server directly. Partitions are nftables rules inside the host namespaces; the client address is
never blocked unless `isolate_client_from(host)` is called. `slow()` shapes a host's link with
`tc tbf` in both directions. Requires root and the `ip` (iproute2), `nft` (nftables) and `tc`
commands. Example::

    with NetLab("mytest", hosts=3) as lab, NatsCluster(lab) as nats:
        nats.wait_ready()
        lab.partition([{"h1"}, {"h2", "h3"}])
        ...
        lab.heal()
"""

from ._netlab_hosts import NetLab, NetLabError, list_namespaces, stop_process
from ._netlab_nats import NatsCluster

__all__ = ["NatsCluster", "NetLab", "NetLabError", "list_namespaces", "stop_process"]

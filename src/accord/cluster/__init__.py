"""The cluster layer: configuration, membership and failure detection, shard leases, placement."""

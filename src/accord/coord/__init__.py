"""Coordination for applications: named leases and elections with fencing tokens, fenced writes,
quorum decisions, barriers and counters — all on JetStream KV, with no coordinator process."""

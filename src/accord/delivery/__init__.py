"""Delivery guarantees above at-most-once: the JetStream mailbox, dead letters, circuit breakers."""

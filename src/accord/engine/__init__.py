"""The engine seam (`_api`) and its implementations: NATS JetStream (`_nats`, the only code that
imports nats-py), the embedded server (`_server`) and, for unit tests, an in-memory engine."""

"""Durable workflows: runs as event-sourced virtual agents (`_workflow`), their journaled steps
(`_context`), the durable timer index (`_timers`) and the client handle (`_client`)."""

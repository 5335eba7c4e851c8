"""Durable agent state: the state bucket (records with epochs and dedup), and event logs."""

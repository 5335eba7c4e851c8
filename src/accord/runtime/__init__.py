"""Hosting agents: `Node` and its parts (activations, bulkheads, inbound dispatch, shard
ownership, cut-off serving, the in-process route), wired together by `Node.start()`."""

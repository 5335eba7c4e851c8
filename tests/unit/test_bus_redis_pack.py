"""The bus's own RESP packing (`accord.bus._redis_wire.pack`) writes exactly what redis-py
would for the arguments the bus sends (str, bytes, int), and refuses anything else."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st

from accord.bus._redis_wire import pack

_CONN = aioredis.Connection()  # packs only: never connected
_ARG = st.one_of(st.text(), st.binary(max_size=7_000), st.integers())


@given(st.lists(st.tuples(st.sampled_from(["XADD", "XACK", "SET"]), st.lists(_ARG, max_size=12)),
                min_size=1, max_size=8))  # fmt: skip
def test_pack_writes_what_redis_py_writes(commands: list[tuple[str, list[object]]]) -> None:
    cmds = [(name, *args) for name, args in commands]
    assert pack(cmds) == b"".join(_CONN.pack_commands(cmds))


@pytest.mark.parametrize("bad", [1.5, True, None, ["a"]])
def test_pack_refuses_an_argument_it_has_no_encoding_for(bad: object) -> None:
    with pytest.raises(TypeError, match="str, bytes or int"):
        pack([("SET", "k", bad)])

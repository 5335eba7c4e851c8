"""The programming model: agent type names, handler dispatch by message type, and AgentId."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import accord
from accord import Agent, AgentId, ConfigurationError, handler
from accord._agent import spec_of
from accord._ids import snake_case
from accord._spec import known_spec


class Ping(msgspec.Struct):
    n: int = 0


class Pong(msgspec.Struct):
    n: int


class Note(msgspec.Struct):
    text: str


class Tagged(msgspec.Struct, tag="model.tagged"):
    pass


class NotAStruct:
    pass


class ModelOrderBook(Agent):
    @handler
    async def on_ping(self, msg: Ping) -> Pong:
        return Pong(msg.n + 1)

    @handler
    async def on_note(self, msg: Note) -> None:
        return None

    async def not_a_handler(self, msg: Ping) -> None:
        return None


class ModelExplicit(Agent, type="model-explicit", idle_timeout=12.5, topics=("orders", "trades")):
    @handler
    async def tagged(self, msg: Tagged) -> str:
        return "tagged"


class ModelChild(ModelOrderBook, type="model-child"):
    @handler
    async def on_note(self, msg: Note) -> None:  # overrides the parent's handler
        return None


class ModelExplicitChild(ModelExplicit, type="model-explicit-child", topics=["audit"]):
    pass


class ModelEmpty(Agent):
    pass


# -- type names ---------------------------------------------------------------------------------


def test_default_type_name_is_the_snake_case_class_name() -> None:
    assert spec_of(ModelOrderBook).type_name == "model_order_book"
    assert spec_of(ModelEmpty).type_name == "model_empty"


def test_class_keyword_sets_the_type_name_and_options() -> None:
    spec = spec_of(ModelExplicit)
    assert spec.type_name == "model-explicit"
    assert spec.idle_timeout == 12.5
    assert spec.topics == ("orders", "trades")
    assert spec.cls is ModelExplicit


def test_defaults_of_options() -> None:
    spec = spec_of(ModelOrderBook)
    assert spec.idle_timeout == 300.0
    assert spec.topics == ()


def test_options_are_inherited_and_overridable() -> None:
    spec = spec_of(ModelExplicitChild)
    assert spec.type_name == "model-explicit-child"
    assert spec.idle_timeout == 12.5
    assert spec.topics == ("audit",)
    assert set(spec.handlers) == {"model.tagged"}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Counter", "counter"),
        ("OrderBook", "order_book"),
        ("Agent2Go", "agent2_go"),
        ("already_snake", "already_snake"),
        ("HTTPServer", "httpserver"),
    ],
)
def test_snake_case(name: str, expected: str) -> None:
    assert snake_case(name) == expected


@pytest.mark.parametrize(
    "bad", ["Upper", "has space", "dot.ted", "slash/ed", "_leading", "-leading", "x" * 64, "é"]
)
def test_bad_type_names_are_rejected_at_class_creation(bad: str) -> None:
    with pytest.raises(ConfigurationError):

        class Bad(Agent, type=bad):
            pass


def test_explicit_empty_type_name_is_rejected() -> None:
    with pytest.raises(ConfigurationError):

        class ModelEmptyTypeName(Agent, type=""):
            pass


@pytest.mark.parametrize("bad", ["counter\n", "counter\n/key"])
def test_trailing_newline_is_not_a_valid_type(bad: str) -> None:
    with pytest.raises(ConfigurationError):
        if "/" in bad:
            AgentId.parse(bad)
        else:
            AgentId(bad, "key")


def test_class_name_that_does_not_snake_case_to_a_valid_type_is_rejected() -> None:
    with pytest.raises(ConfigurationError):

        class _Private(Agent):  # "_private" starts with '_'
            pass


@pytest.mark.parametrize("timeout", [0, -1, -0.5])
def test_non_positive_idle_timeout_is_rejected(timeout: float) -> None:
    with pytest.raises(ConfigurationError, match="idle_timeout"):

        class ModelBadIdle(Agent, type="model-bad-idle", idle_timeout=timeout):
            pass


def test_spec_of_rejects_non_agents() -> None:
    with pytest.raises(ConfigurationError):
        spec_of(NotAStruct)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        spec_of(Agent)


def test_defined_specs_are_registered_by_type_name() -> None:
    assert known_spec("model-explicit") is spec_of(ModelExplicit)
    assert known_spec("model-no-such-type") is None


# -- handlers ---------------------------------------------------------------------------------


def test_handlers_are_dispatched_by_annotated_message_type() -> None:
    spec = spec_of(ModelOrderBook)
    assert set(spec.handlers) == {"Ping", "Note"}
    assert spec.handler_for_name("Ping").name == "on_ping"  # type: ignore[union-attr]
    assert spec.by_class[Ping].name == "on_ping"
    assert spec.by_class[Note].name == "on_note"
    assert spec.by_class[Ping].msg_type is Ping
    assert spec.by_class[Ping].returns is Pong
    assert spec.by_class[Note].returns is type(None)
    assert spec.handler_for_name("Pong") is None


async def test_handler_spec_calls_the_method() -> None:
    h = spec_of(ModelOrderBook).by_class[Ping]
    assert await h.fn(ModelOrderBook(), Ping(41)) == Pong(42)


def test_tagged_message_types_dispatch_by_tag() -> None:
    spec = spec_of(ModelExplicit)
    assert set(spec.handlers) == {"model.tagged"}
    assert spec.by_class[Tagged].name == "tagged"
    assert spec.by_class[Tagged].returns is str


def test_subclass_inherits_and_overrides_handlers() -> None:
    spec = spec_of(ModelChild)
    assert spec.type_name == "model-child"
    assert set(spec.handlers) == {"Ping", "Note"}
    assert spec.by_class[Note].fn is ModelChild.on_note
    assert spec.by_class[Ping].fn is ModelOrderBook.on_ping


def test_agent_with_no_handlers_is_allowed() -> None:
    assert spec_of(ModelEmpty).handlers == {}


def test_non_async_handler_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match="async"):

        class ModelSync(Agent, type="model-sync"):
            @handler  # type: ignore[type-var]
            def on_ping(self, msg: Ping) -> None:
                pass


def test_missing_annotation_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match=r"msgspec\.Struct"):

        class ModelUnannotated(Agent, type="model-unannotated"):
            @handler
            async def on_ping(self, msg):  # type: ignore[no-untyped-def]
                pass


@pytest.mark.parametrize("annotation", ["int", "dict", "NotAStruct", "Ping | None", "list[Ping]"])
def test_non_struct_annotation_is_rejected(annotation: str) -> None:
    ns: dict[str, object] = {}
    src = (
        "class ModelWrongType(Agent, type='model-wrong-type'):\n"
        "    @handler\n"
        f"    async def on_msg(self, msg: {annotation}) -> None:\n"
        "        pass\n"
    )
    with pytest.raises(ConfigurationError, match=r"msgspec\.Struct"):
        exec(src, {**globals(), **ns})


def test_handler_with_wrong_arity_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match="exactly one message parameter"):

        class ModelTwoArgs(Agent, type="model-two-args"):
            @handler
            async def on_ping(self, msg: Ping, extra: Ping) -> None:
                pass

    with pytest.raises(ConfigurationError, match="exactly one message parameter"):

        class ModelNoArgs(Agent, type="model-no-args"):
            @handler
            async def on_ping(self) -> None:
                pass


def test_unresolvable_annotation_is_a_configuration_error() -> None:
    class Local(msgspec.Struct):  # not at module level: the string annotation cannot resolve
        pass

    with pytest.raises(ConfigurationError, match="cannot resolve annotations"):

        class ModelLocalType(Agent, type="model-local-type"):
            @handler
            async def on_local(self, msg: Local) -> None:
                pass


def test_handler_decorator_marks_the_function_and_returns_it() -> None:
    async def fn(self: object, msg: Ping) -> None:
        pass

    assert handler(fn) is fn


# -- AgentId ------------------------------------------------------------------------------------

agent_types = st.from_regex(r"\A[a-z0-9][a-z0-9_\-]{0,62}\Z")
agent_keys = st.text(min_size=1, max_size=512)


@settings(max_examples=300, deadline=None)
@given(agent_type=agent_types, key=agent_keys)
def test_agent_id_str_parse_round_trip(agent_type: str, key: str) -> None:
    agent_id = AgentId(agent_type, key)
    text = str(agent_id)
    assert text == f"{agent_type}/{key}"
    assert AgentId.parse(text) == agent_id


def test_agent_id_key_may_contain_slashes() -> None:
    agent_id = AgentId.parse("files/a/b/c")
    assert agent_id == AgentId("files", "a/b/c")
    assert str(agent_id) == "files/a/b/c"


def test_agent_id_is_hashable_ordered_and_immutable() -> None:
    a, b = AgentId("t", "a"), AgentId("t", "b")
    assert {a, AgentId("t", "a")} == {a}
    assert sorted([b, a]) == [a, b]
    with pytest.raises(AttributeError):
        a.key = "z"  # type: ignore[misc]


@pytest.mark.parametrize(
    "text", ["", "no-slash", "/key", "type/", "Type/key", "bad type/key", "t/" + "k" * 513]
)
def test_agent_id_parse_rejects_malformed_ids(text: str) -> None:
    with pytest.raises(ConfigurationError):
        AgentId.parse(text)


@pytest.mark.parametrize(
    ("agent_type", "key"), [("ok", ""), ("ok", "k" * 513), ("", "k"), ("UP", "k"), ("a.b", "k")]
)
def test_agent_id_constructor_validates(agent_type: str, key: str) -> None:
    with pytest.raises(ConfigurationError):
        AgentId(agent_type, key)


def test_agent_id_key_length_limit_is_inclusive() -> None:
    assert AgentId("t", "k" * 512).key == "k" * 512


def test_configuration_error_is_also_a_value_error() -> None:
    with pytest.raises(ValueError):
        AgentId.parse("nope")
    assert issubclass(ConfigurationError, accord.AccordError)

"""How a JSON message is declared (sgxvtpm.wire.jsonmsg): a subclass of Message is a
frozen dataclass, a request names its op by class keyword and its reply by its
generic parameter, and a Codec takes the protocol's union of requests; mypy (strict)
reads the same declarations as dataclasses (fields, frozen, constructor)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
import typing
from pathlib import Path
from typing import TypeAlias

import pytest

from sgxvtpm.errors import LocalProtocolError, RemoteProtocolError
from sgxvtpm.wire.jsonmsg import Codec, Done, Message, Reply, Request


class _Error(RemoteProtocolError):
    pass


class _UsageError(LocalProtocolError):
    pass


class Part(Message):
    label: str
    weight: int = 0


class Counted(Reply):
    count: int
    parts: tuple[Part, ...] = ()


class Count(Request[Counted], op="count"):
    """A request with a reply of its own."""

    name: str
    limit: int | None = None


class Forget(Request[Done], op="forget"):
    name: str = dataclasses.field(default="all")


_Requests: TypeAlias = Count | Forget


def test_a_message_subclass_is_a_frozen_dataclass() -> None:
    part = Part("a", weight=2)
    assert dataclasses.is_dataclass(part)
    assert [f.name for f in dataclasses.fields(Count)] == ["name", "limit"]
    assert part == Part("a", 2) and hash(part) == hash(Part("a", 2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        part.label = "b"  # type: ignore[misc]
    assert Forget() == Forget("all")


def test_a_request_takes_its_op_from_the_class_keyword_and_its_reply_from_its_parameter() -> None:
    assert Count.OP == "count"
    assert Count.REPLY is Counted
    assert Forget.OP == "forget"
    assert Forget.REPLY is Done


def test_a_request_must_name_a_reply_class() -> None:
    with pytest.raises(TypeError, match="must name its reply"):

        class Nameless(Request, op="nameless"):  # type: ignore[type-arg]
            pass

    with pytest.raises(TypeError, match="must name its reply"):

        class NotAReply(Request[Part], op="wrong"):  # type: ignore[type-var]
            pass


def test_a_codec_takes_the_union_of_its_requests() -> None:
    codec: Codec[_Requests] = Codec("test", _Requests, _Error, _UsageError)
    assert codec.requests == {"count": Count, "forget": Forget}
    request = Count("x", limit=3)
    assert codec.encode_request(request) == b'{"op":"count","name":"x","limit":3}'
    assert codec.decode_request(codec.encode_request(request)) == request
    reply = Counted(2, (Part("p", 1),))
    assert codec.decode_reply(request, codec.encode_reply(reply)) == reply
    single: Codec[Forget] = Codec("one", Forget, _Error, _UsageError)
    assert single.requests == {"forget": Forget}
    with pytest.raises(TypeError, match="not a request class"):
        Codec("bad", Count | Part, _Error, _UsageError)


_TYPED = '''
from sgxvtpm.wire.jsonmsg import Done, Reply, Request

class Shown(Reply):
    name: str
    size: int = 0

class Show(Request[Shown], op="show"):
    name: str

def reply_of(request: Request[Shown]) -> Shown:
    return Shown(request.__class__.__name__)

show = Show("vm")
reveal_type(show.name)
reveal_type(Shown.__init__)
reveal_type(reply_of(show))
show.name = "other"
Show(3)
Shown("a", size="b")

class NoOp(Request[Done]):
    pass
'''


def test_mypy_reads_the_declarations_as_frozen_dataclasses(tmp_path: Path) -> None:
    source = tmp_path / "typed.py"
    source.write_text(textwrap.dedent(_TYPED))
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(source)],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    out = result.stdout.replace("builtins.", "")  # older mypy names builtins in full
    assert 'Revealed type is "str"' in out
    assert 'Revealed type is "def (self: typed.Shown, name: str, size: int =)"' in out
    assert 'Revealed type is "typed.Shown"' in out
    assert 'Property "name" defined in "Show" is read-only' in out
    assert 'Argument 1 to "Show" has incompatible type "int"; expected "str"' in out
    assert 'Argument "size" to "Shown" has incompatible type "str"; expected "int"' in out
    assert 'Missing positional argument "op" in call to "__init_subclass__"' in out
    assert out.count("error:") == 4, out


class Node(Message):
    """A message that holds messages of its own class."""

    name: str
    children: tuple[Node, ...] = ()
    labels: dict[str, Part] | None = None


class Grow(Request[Done], op="grow"):
    root: Node


def test_a_codec_plans_its_messages_when_built_and_converts_without_reflection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An enclave forked from the zygote copies the pages of every function it runs
    # for the first time: the annotations are read once, when the codec is built
    # (at import, in the zygote), not per message.
    codec: Codec[Grow] = Codec("tree", Grow, _Error, _UsageError)

    def no_reflection(*args: object) -> None:
        raise AssertionError("typing reflection while converting a message")

    for name in ("get_type_hints", "get_origin", "get_args"):
        monkeypatch.setattr(typing, name, no_reflection)
    monkeypatch.setattr(dataclasses, "fields", no_reflection)
    request = Grow(Node("a", (Node("b", labels={"x": Part("p", 1)}), Node("c"))))
    data = codec.encode_request(request)
    assert json.loads(data)["root"]["children"][0]["labels"] == {"x": {"label": "p", "weight": 1}}
    assert codec.decode_request(data) == request
    with pytest.raises(_Error, match=r"grow\.root\.children\[1\]\.name: expected str, got int"):
        codec.decode_request(b'{"op":"grow","root":{"name":"a","children":[{"name":"b"},{"name":1}]}}')
    with pytest.raises(_UsageError, match=r"grow\.root\.labels\['x'\]: expected Part, got str"):
        codec.encode_request(Grow(Node("a", labels={"x": "p"})))  # type: ignore[dict-item]


def test_a_field_type_the_form_cannot_carry_is_refused_when_the_codec_is_built() -> None:
    class Odd(Reply):
        values: set[int]

    class AskOdd(Request[Odd], op="odd"):
        pass

    with pytest.raises(TypeError, match=r"unsupported message field type set\[int\]"):
        Codec("odd", AskOdd, _Error, _UsageError)
    # and a failed plan leaves nothing behind: building again fails the same way
    with pytest.raises(TypeError, match="unsupported message field type"):
        Codec("odd", AskOdd, _Error, _UsageError)

"""JSON control messages, typed (sans-IO): what :mod:`~sgxvtpm.wire.k1`,
:mod:`~sgxvtpm.wire.control` and :mod:`~sgxvtpm.wire.admin` share.

Each of those protocols carries one request or one reply per message, as a
JSON object (UTF-8)::

    request   {"op": OP, FIELD: VALUE, ...}
    reply     {"ok": true, FIELD: VALUE, ...}   or   {"ok": false, "error": TEXT}

A message is a frozen dataclass (a subclass of :class:`Message`; a request
names its op and its reply as ``class ShowVm(Request[Shown], op="show")``);
its fields' annotations say their JSON form:
``str``, ``int``, ``float`` (finite), ``bool`` as themselves, ``bytes`` as hex,
``X | None`` as X or null, ``tuple[X, ...]`` as an array, ``dict[str, X]`` as
an object, another message dataclass as an object. A field may carry a check
(:func:`check_with`), applied on both ends.

Decoding ignores fields it does not know (the relay's ``"id"`` among them:
:mod:`sgxvtpm.wire.relay` correlates CONTROL replies by it, and this codec
leaves it to the transport) and fills in missing fields that have a default.
Anything else malformed raises the protocol's :class:`RemoteProtocolError`
subclass, never ``KeyError`` or ``TypeError``; building a message that cannot
be encoded raises its :class:`LocalProtocolError` subclass.

Replies do not name their op, so a reply is decoded for the request it
answers: ``decode_reply(request, data)`` gives the request's reply type, or
:class:`Refused`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import string
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeAlias, TypeVar, Union, cast

from sgxvtpm.errors import LocalProtocolError, RemoteProtocolError

JsonValue: TypeAlias = (
    "bool | int | float | str | list[JsonValue] | dict[str, JsonValue] | None"
)
JsonObject: TypeAlias = dict[str, JsonValue]

#: Keys of the envelope (requests: "op"; replies: "ok", "error"; both: the
#: relay's "id"); no message field may use them.
RESERVED = frozenset({"op", "ok", "error", "id"})
_HEX = frozenset(string.hexdigits)


@typing.dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field,))
class Message:
    """Base of every message (a request, a reply, or a part of one).

    A subclass is a frozen dataclass: its annotated fields are the message's,
    declared as in ``@dataclass(frozen=True)`` (which it must not add itself).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        dataclasses.dataclass(frozen=True)(cls)


class Reply(Message):
    """Base of the replies that say ``"ok": true``."""


R = TypeVar("R", bound=Reply)
M = TypeVar("M", bound=Message)


class Request(Message, Generic[R]):
    """Base of the requests, declared as ``class DestroyVm(Request[Done], op="destroy")``.

    ``OP`` is the wire name (the class keyword ``op``); ``REPLY`` what answers
    it (R, the class given to ``Request``).
    """

    OP: ClassVar[str]
    REPLY: ClassVar[type[Reply]]

    def __init_subclass__(cls, op: str, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        replies = [
            reply
            for base in cls.__dict__.get("__orig_bases__", ())
            if typing.get_origin(base) is Request
            for reply in typing.get_args(base)
            if isinstance(reply, type) and issubclass(reply, Reply)
        ]
        if len(replies) != 1:
            raise TypeError(f"{cls.__name__} must name its reply, as Request[Done]")
        cls.OP = op
        (cls.REPLY,) = replies


class Done(Reply):
    """The reply of a request that has nothing to say but that it was done."""


@dataclasses.dataclass(frozen=True)
class Refused:
    """``{"ok": false, "error": TEXT}``: the peer did not do the request, and says why."""

    error: str = "refused without a reason"


def check_with(check: Callable[[Any], None]) -> dict[str, Callable[[Any], None]]:
    """Field metadata: the value must pass ``check`` (which raises ValueError saying why
    not), as in ``name: str = field(metadata=check_with(check_name))``."""
    return {"check": check}


# ------------------------------------------------------------------ values

_Error = type[RemoteProtocolError] | type[LocalProtocolError]


def _describe(tp: object) -> str:
    return getattr(tp, "__name__", None) or str(tp)


# A field's form: its annotation worked out once, when its class is first
# planned (at import, by the protocol's Codec), so that encoding and decoding
# run no reflection (typing, dataclasses.fields): a scalar type or message
# class stands for itself; ``X | None``, ``tuple[X, ...]`` and ``dict[str, X]``
# become (_OPTIONAL, X's form, annotation), (_TUPLE, ...), (_DICT, ...). Each
# Python function an enclave runs for the first time makes it copy the
# interpreter's pages that hold that function's objects (reference counts),
# so fewer functions per message is less memory per enclave, as well as less
# time.
_OPTIONAL, _TUPLE, _DICT = "optional", "tuple", "dict"
_SCALARS = (str, bool, int, float, bytes)

#: A message class's fields: (name, form, required, check or None).
_Plan: TypeAlias = tuple[tuple[str, Any, bool, Callable[[Any], None] | None], ...]
_PLANS: dict[type[Message], _Plan] = {}


def _form(tp: Any) -> Any:
    if tp in _SCALARS:
        return tp
    if isinstance(tp, type) and issubclass(tp, Message):
        _plan(tp)
        return tp
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType) and type(None) in args:
        (inner,) = (a for a in args if a is not type(None))
        return (_OPTIONAL, _form(inner), tp)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return (_TUPLE, _form(args[0]), tp)
    if origin is dict and args[:1] == (str,):
        return (_DICT, _form(args[1]), tp)
    raise TypeError(f"unsupported message field type {tp!r}")


def _plan(cls: type[Message]) -> _Plan:
    """``cls``'s fields, planned once (and the message classes they hold)."""
    plan = _PLANS.get(cls)
    if plan is None:
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(cast(Any, cls))
        _PLANS[cls] = ()  # a message that holds its own class: planned below
        try:
            plan = tuple(
                (
                    f.name,
                    _form(hints[f.name]),
                    f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
                    f.metadata.get("check"),
                )
                for f in fields
            )
        except BaseException:
            del _PLANS[cls]
            raise
        _PLANS[cls] = plan
    return plan


def _convert(form: Any, value: object, where: str, error: _Error, decoding: bool) -> Any:
    """``value`` (JSON when decoding, Python when encoding) as the other side of ``form``."""
    if form is str:
        if isinstance(value, str):
            return value
    elif form is bool:
        if isinstance(value, bool):
            return value
    elif form is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
    elif form is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
            if math.isfinite(number):
                return number
            raise error(f"{where}: {number} is not a finite number")
    elif form is bytes:
        if decoding and isinstance(value, str):
            if len(value) % 2 or not _HEX.issuperset(value):
                raise error(f"{where}: not hex")
            return bytes.fromhex(value)
        if not decoding and isinstance(value, bytes):
            return value.hex()
    elif type(form) is tuple:
        kind, inner, tp = form
        if kind == _OPTIONAL:
            return None if value is None else _convert(inner, value, where, error, decoding)
        if kind == _TUPLE:
            if isinstance(value, tuple) or (decoding and isinstance(value, list)):
                converted = []
                for i, item in enumerate(value):
                    converted.append(_convert(inner, item, f"{where}[{i}]", error, decoding))
                return tuple(converted) if decoding else converted
        elif isinstance(value, dict):  # _DICT
            out = {}
            for key, item in value.items():
                if not isinstance(key, str):
                    raise error(f"{where}: key {key!r} is not a string")
                out[key] = _convert(inner, item, f"{where}[{key!r}]", error, decoding)
            return out
        form = tp
    elif decoding:  # a message class
        return _from_object(form, value, where, error)  # type: ignore[arg-type]
    elif isinstance(value, form):
        return _to_object(value, where, error)  # type: ignore[arg-type]
    raise error(f"{where}: expected {_describe(form)}, got {type(value).__name__}")


def _checked(check: Callable[[Any], None], value: object, where: str, error: _Error) -> None:
    if value is not None:
        try:
            check(value)
        except ValueError as exc:
            raise error(f"{where}: {exc}") from None


def _to_object(message: Message, where: str, error: type[LocalProtocolError]) -> JsonObject:
    out: JsonObject = {}
    for name, form, _, check in _plan(type(message)):
        value = getattr(message, name)
        if check is not None:
            _checked(check, value, f"{where}.{name}", error)
        out[name] = _convert(form, value, f"{where}.{name}", error, False)
    return out


def _from_object(
    cls: type[M], obj: object, where: str, error: type[RemoteProtocolError]
) -> M:
    if not isinstance(obj, dict):
        raise error(f"{where}: expected an object, got {type(obj).__name__}")
    kwargs: dict[str, Any] = {}
    for name, form, required, check in _plan(cls):
        if name not in obj:
            if required:
                raise error(f"{where}: missing field {name!r}")
            continue
        value = _convert(form, obj[name], f"{where}.{name}", error, True)
        if check is not None:
            _checked(check, value, f"{where}.{name}", error)
        kwargs[name] = value
    return cls(**kwargs)


def to_json(message: Message, usage_error: type[LocalProtocolError]) -> JsonObject:
    """The JSON object of one message (no envelope); ``usage_error`` if it has none."""
    return _to_object(message, type(message).__name__, usage_error)


def from_json(cls: type[M], obj: object, error: type[RemoteProtocolError]) -> M:
    """The ``cls`` message in ``obj`` (no envelope); ``error`` if it is none."""
    return _from_object(cls, obj, cls.__name__, error)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


# One of each, as json.loads and json.dumps keep theirs (both are stateless
# between calls): not a new encoder or decoder object per message.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_DECODER = json.JSONDecoder(parse_constant=_no_constant)


def _dumps(obj: JsonObject) -> bytes:
    return _ENCODER.encode(obj).encode("utf-8")


def _loads(data: bytes, error: type[RemoteProtocolError]) -> object:
    try:
        return _DECODER.decode(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: deep nesting
        raise error("not a UTF-8 JSON document") from None


# ------------------------------------------------------------------ a protocol


Q = TypeVar("Q", bound="Request[Any]")


class Codec(Generic[Q]):
    """One protocol's requests (Q, their union) and its two errors.

    ``requests`` is that union itself (``Codec("fleet", FleetRequest, ...)``
    with ``FleetRequest: TypeAlias = Join | Moved | Move``), so the protocol
    lists its requests once. A protocol module publishes the bound methods it
    offers as its functions (``encode_request = _CODEC.encode_request``, ...).
    """

    def __init__(
        self,
        name: str,
        requests: object,
        error: type[RemoteProtocolError],
        usage_error: type[LocalProtocolError],
    ) -> None:
        self.name = name
        self.error = error
        self.usage_error = usage_error
        self.requests: dict[str, type[Request[Any]]] = {}
        for cls in typing.get_args(requests) or (requests,):
            if not (isinstance(cls, type) and issubclass(cls, Request)):
                raise TypeError(f"{cls!r} is not a request class")
            for part in (cls, cls.REPLY):
                clash = RESERVED & {name for name, *_ in _plan(part)}
                if clash:
                    raise TypeError(f"{part.__name__} uses reserved field names {clash}")
            self.requests[cls.OP] = cls

    # -- requests --
    def request_to_json(self, request: Request[Any]) -> JsonObject:
        """The JSON object of ``request``; the usage error if it cannot be encoded."""
        cls = type(request)
        if self.requests.get(getattr(cls, "OP", "")) is not cls:
            raise self.usage_error(f"{cls.__name__} is not a {self.name} request")
        return {"op": cls.OP, **_to_object(request, cls.OP, self.usage_error)}

    def request_from_json(self, obj: object) -> Q:
        """The request in a message's object; the protocol error if it is none."""
        if not isinstance(obj, dict):
            raise self.error(f"{self.name} request is not a JSON object")
        op = obj.get("op")
        cls = self.requests.get(op) if isinstance(op, str) else None
        if cls is None:
            raise self.error(f"unknown {self.name} op {_short(op)}")
        return cast(Q, _from_object(cls, obj, cls.OP, self.error))

    def encode_request(self, request: Request[Any]) -> bytes:
        """The message for ``request``; the usage error if it cannot be encoded."""
        return _dumps(self.request_to_json(request))

    def decode_request(self, data: bytes) -> Q:
        """The request in ``data``; the protocol error if it is none."""
        return self.request_from_json(_loads(data, self.error))

    # -- replies --
    def reply_to_json(self, reply: Reply | Refused) -> JsonObject:
        """The JSON object of ``reply``; the usage error if it cannot be encoded."""
        if isinstance(reply, Refused):
            if not isinstance(reply.error, str):
                raise self.usage_error("Refused.error must be a string")
            return {"ok": False, "error": reply.error}
        if not isinstance(reply, Reply):
            raise self.usage_error(f"{type(reply).__name__} is not a reply")
        return {"ok": True, **_to_object(reply, type(reply).__name__, self.usage_error)}

    def reply_from_json(self, request: Request[R], obj: object) -> R | Refused:
        """The reply to ``request`` in a message's object; the protocol error if none."""
        if not isinstance(obj, dict):
            raise self.error(f"{self.name} reply is not a JSON object")
        ok = obj.get("ok", False)
        if not isinstance(ok, bool):
            raise self.error(f"{self.name} reply: 'ok' is not a boolean")
        if not ok:
            error = obj.get("error", Refused.error)
            if not isinstance(error, str):
                raise self.error(f"{self.name} reply: 'error' is not a string")
            return Refused(error)
        cls = type(request).REPLY
        return cast(R, _from_object(cls, obj, f"reply to {type(request).OP}", self.error))

    def encode_reply(self, reply: Reply | Refused) -> bytes:
        """The message for ``reply``; the usage error if it cannot be encoded."""
        return _dumps(self.reply_to_json(reply))

    def decode_reply(self, request: Request[R], data: bytes) -> R | Refused:
        """The reply to ``request`` in ``data``; the protocol error if it is none."""
        return self.reply_from_json(request, _loads(data, self.error))


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."

# Typed surface of the compiled fastnet._message; the signatures are those of
# fastnet._message_py, its pure-Python twin (types for C accelerators are the same).
from collections.abc import Callable
from typing import Any

__all__ = [
    "ALL_STATES",
    "Dispatcher",
    "Route",
    "Session",
    "encode_message",
    "error_body",
    "pack_header",
    "parse_error_body",
    "parse_header",
]

ALL_STATES: int

def pack_header(kind: int, type_: int, id_: int, deadline: int = 0) -> bytes: ...
def encode_message(kind: int, type_: int, id_: int, deadline: int, body: Any) -> bytes: ...
def parse_header(frame: Any) -> tuple[int, int, int, int]: ...
def error_body(code: int, message: str) -> bytes: ...
def parse_error_body(body: Any) -> tuple[int, str]: ...

class Route:
    type_id: int
    handler: Callable[..., Any]
    decode: Callable[[bytes], Any] | None
    is_async: bool
    allowed: int
    name: str
    def __init__(
        self,
        type_id: int,
        handler: Callable[..., Any],
        decode: Callable[[bytes], Any] | None,
        is_async: bool,
        allowed: int,
        name: str,
    ) -> None: ...

class Session:
    state: int
    in_flight: int
    backlog: Any
    failed: bool
    draining: bool
    tasks: set[Any] | None
    def __init__(self, state: int) -> None: ...

class Dispatcher:
    def __init__(
        self,
        router: Any,
        routes: list[Route | None],
        replies: dict[type, tuple[int, Callable[[Any], Any]]],
        max_in_flight: int,
        initial_state: int,
        max_frame: int = -1,
    ) -> None: ...
    def session(self, conn: Any) -> Session: ...
    def __call__(self, conn: Any, frames: list[bytes]) -> list[bytes] | None: ...
    def run(
        self, conn: Any, session: Session, frames: list[bytes], start: int, read_at: float
    ) -> list[bytes] | None: ...
    def reply(self, conn: Any, route: Route, id_: int, result: Any) -> bytes: ...

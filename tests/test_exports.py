"""Each compiled module, its pure-Python twin and its stub describe one API.

``fastnet._frame`` (Cython), ``fastnet._frame_py`` and ``src/fastnet/_frame.pyi``
(likewise ``_outq``, ``_outq_py`` and ``_outq.pyi``) must export the same
public names; each public class must have the same public methods and
attributes in all three, with the same parameters (names, kinds, defaults),
and the stub's annotations must be the twin's (the stub types the compiled
module, and the twin is the reference). Any drift between
the backends shows up here before it shows up as a behaviour difference.

Names are public when they do not start with an underscore. A module's public
names are its ``__all__``, or, without one, the classes and functions it
defines. Signatures of compiled methods come from ``inspect`` (Cython 3 binds
them as introspectable functions); a compiled class's constructor signature
comes from the first line of its docstring, which ``embedsignature`` writes.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, WrapperDescriptorType
from typing import Any

import pytest

import fastnet

STUB_DIR = Path(fastnet.__file__).parent


@dataclass(frozen=True, eq=False)
class Param:
    name: str
    kind: str  # "positional", "keyword" (keyword-only), "*args" or "**kwargs"
    default: str | None  # ast.unparse of the default value; None: no default
    annotation: str | None = None  # normalized; None: not annotated (or not known)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Param):
            return NotImplemented
        # A stub may write a default as `...`: it has one, value unstated.
        defaults_match = self.default == other.default or (
            self.default is not None
            and other.default is not None
            and "..." in (self.default, other.default)
        )
        return (self.name, self.kind, self.annotation) == (
            other.name,
            other.kind,
            other.annotation,
        ) and defaults_match

    def __hash__(self) -> int:
        return hash((self.name, self.kind, self.annotation))


@dataclass(frozen=True)
class Member:
    kind: str  # "method", "staticmethod", "classmethod" or "attribute"
    params: tuple[Param, ...] | None = None  # without self/cls; None for attributes
    returns: str | None = None


Api = dict[str, dict[str, Member] | None]  # public name -> members of a class, or None


def _norm_expr(source: str | None) -> str | None:
    """One spelling for an annotation or default: ``ast.unparse(ast.parse(...))``."""
    if source is None:
        return None
    try:
        return ast.unparse(ast.parse(source.strip(), mode="eval"))
    except SyntaxError:
        return source.strip()


# --- the stub, read with ast --------------------------------------------------


def _stub_params(args: ast.arguments, drop_first: bool) -> tuple[Param, ...]:
    params: list[Param] = []
    positional = args.posonlyargs + args.args
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(args.defaults))
    defaults += list(args.defaults)
    for arg, default in zip(positional, defaults, strict=True):
        params.append(_stub_param(arg, "positional", default))
    if args.vararg:
        params.append(_stub_param(args.vararg, "*args", None))
    for arg, kw_default in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        params.append(_stub_param(arg, "keyword", kw_default))
    if args.kwarg:
        params.append(_stub_param(args.kwarg, "**kwargs", None))
    return tuple(params[1:] if drop_first else params)


def _stub_param(arg: ast.arg, kind: str, default: ast.expr | None) -> Param:
    return Param(
        name=arg.arg,
        kind=kind,
        default=None if default is None else _norm_expr(ast.unparse(default)),
        annotation=None if arg.annotation is None else _norm_expr(ast.unparse(arg.annotation)),
    )


def _decorators(node: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    return {ast.unparse(d).rsplit(".", 1)[-1] for d in node.decorator_list}


def _stub_class_members(node: ast.ClassDef, classes: dict[str, ast.ClassDef]) -> dict[str, Member]:
    members: dict[str, Member] = {}
    # Bases first, so that the class's own definitions override them; only
    # bases defined in the stub itself are followed (object adds nothing public).
    for base in node.bases:
        base_node = classes.get(ast.unparse(base))
        if base_node is not None:
            members.update(_stub_class_members(base_node, classes))
    for item in node.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = item.name
            if name.startswith("_") and name != "__init__":
                continue
            decorators = _decorators(item)
            if "setter" in decorators or "deleter" in decorators:
                continue
            if "property" in decorators or "cached_property" in decorators:
                members[name] = Member("attribute")
                continue
            kind = "method"
            if "staticmethod" in decorators:
                kind = "staticmethod"
            elif "classmethod" in decorators:
                kind = "classmethod"
            members[name] = Member(
                kind,
                _stub_params(item.args, drop_first=kind != "staticmethod"),
                None if item.returns is None else _norm_expr(ast.unparse(item.returns)),
            )
        elif (
            isinstance(item, ast.AnnAssign)
            and isinstance(item.target, ast.Name)
            and not item.target.id.startswith("_")
        ):
            members[item.target.id] = Member("attribute")
    return members


def stub_api(path: Path) -> Api:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    declared: list[str] | None = None
    defined: dict[str, dict[str, Member] | None] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            defined[node.name] = _stub_class_members(node, classes)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            defined[node.name] = None
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [t.id for t in targets if isinstance(t, ast.Name)]
            if "__all__" in names and node.value is not None:
                declared = list(ast.literal_eval(node.value))
            else:
                for name in names:
                    defined.setdefault(name, None)
    if declared is None:
        declared = [n for n, node in classes.items() if not n.startswith("_")] + [
            n.name
            for n in tree.body
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and not n.name.startswith("_")
        ]
    missing = [n for n in declared if n not in defined]
    assert not missing, f"{path.name}: __all__ names {missing} are not defined in the stub"
    return {name: defined[name] for name in declared}


# --- a module, introspected ---------------------------------------------------

_KINDS = {
    inspect.Parameter.POSITIONAL_ONLY: "positional",
    inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional",
    inspect.Parameter.KEYWORD_ONLY: "keyword",
    inspect.Parameter.VAR_POSITIONAL: "*args",
    inspect.Parameter.VAR_KEYWORD: "**kwargs",
}


def _annotation(value: Any) -> str | None:
    if value is inspect.Parameter.empty:
        return None
    if isinstance(value, str):  # `from __future__ import annotations`
        return _norm_expr(value)
    return None  # an evaluated annotation (Cython's C types): not compared


def _signature_params(sig: inspect.Signature, drop_first: bool) -> tuple[Param, ...]:
    params = list(sig.parameters.values())
    if drop_first:
        params = params[1:]
    return tuple(
        Param(
            name=p.name,
            kind=_KINDS[p.kind],
            default=None if p.default is inspect.Parameter.empty else _norm_expr(repr(p.default)),
            annotation=_annotation(p.annotation),
        )
        for p in params
    )


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if current.strip():
        parts.append(current)
    return [p.strip() for p in parts]


def _embedded_params(cls: type) -> tuple[Param, ...]:
    """Constructor parameters from the ``Name(args)`` line embedsignature writes."""
    doc = cls.__doc__ or ""
    match = re.match(rf"\s*{re.escape(cls.__name__)}\((.*)\)", doc)
    assert match, (
        f"{cls.__module__}.{cls.__name__}: no constructor signature on the first line "
        f"of its docstring (compile with embedsignature=True); docstring: {doc[:80]!r}"
    )
    params = []
    kind = "positional"
    for part in _split_top_level(match.group(1)):
        if part == "*":
            kind = "keyword"
            continue
        if part == "/":
            continue
        head, _, default = part.partition("=")
        # "Py_ssize_t size=-1" or "spec: LengthPrefixed": the name is the
        # last word before any annotation.
        name = head.split(":", 1)[0].split()[-1]
        this_kind = kind
        if name.startswith("**"):
            name, this_kind = name[2:], "**kwargs"
        elif name.startswith("*"):
            name, this_kind, kind = name[1:], "*args", "keyword"
        params.append(Param(name, this_kind, _norm_expr(default) if default else None))
    if params and params[0].name == "self":
        params = params[1:]
    return tuple(params)


def _class_members(cls: type) -> dict[str, Member]:
    members: dict[str, Member] = {}
    for name in dir(cls):
        if name.startswith("_") and name != "__init__":
            continue
        raw = inspect.getattr_static(cls, name)
        if name == "__init__":
            if raw is object.__init__:
                members[name] = Member("method", ())
                continue
            if isinstance(raw, WrapperDescriptorType):
                # A compiled class's slot wrapper: inspect sees only
                # (*args, **kwargs), the docstring has the real parameters.
                members[name] = Member("method", _embedded_params(cls))
                continue
            sig = inspect.signature(raw)
            members[name] = Member(
                "method", _signature_params(sig, True), _annotation(sig.return_annotation)
            )
            continue
        if isinstance(raw, staticmethod):
            kind, func, drop = "staticmethod", raw.__func__, False
        elif isinstance(raw, classmethod):
            kind, func, drop = "classmethod", raw.__func__, True
        elif inspect.isroutine(raw):
            kind, func, drop = "method", raw, True
        else:  # property, getset descriptor, data
            members[name] = Member("attribute")
            continue
        sig = inspect.signature(func)
        members[name] = Member(
            kind, _signature_params(sig, drop), _annotation(sig.return_annotation)
        )
    return members


def module_api(module: ModuleType) -> Api:
    declared = getattr(module, "__all__", None)
    if declared is None:
        declared = [
            name
            for name, obj in vars(module).items()
            if not name.startswith("_")
            and (inspect.isclass(obj) or inspect.isroutine(obj))
            and getattr(obj, "__module__", None) == module.__name__
        ]
    missing = [n for n in declared if not hasattr(module, n)]
    assert not missing, f"{module.__name__}.__all__ names {missing} that it does not define"
    return {
        name: _class_members(obj) if inspect.isclass(obj := getattr(module, name)) else None
        for name in declared
    }


# --- comparisons --------------------------------------------------------------


def _without_annotations(api: dict[str, Member] | None) -> dict[str, Member] | None:
    if api is None:
        return None
    return {
        name: Member(
            m.kind,
            None if m.params is None else tuple(Param(p.name, p.kind, p.default) for p in m.params),
        )
        for name, m in api.items()
    }


def _diff(left_name: str, left: Any, right_name: str, right: Any) -> str:
    lines = [f"{left_name} and {right_name} differ:"]
    if isinstance(left, dict) and isinstance(right, dict):
        for key in sorted(set(left) | set(right)):
            a, b = left.get(key, "<missing>"), right.get(key, "<missing>")
            if a != b:
                lines.append(f"  {key}:\n    {left_name}: {a}\n    {right_name}: {b}")
    else:
        lines.append(f"  {left_name}: {left}\n  {right_name}: {right}")
    return "\n".join(lines)


# Each compiled module, its pure-Python twin, and the public names its API must have.
PAIRS = {
    "_frame": (
        "_frame_py",
        {
            "LengthPrefixedDecoder": {"feed", "get_buffer", "buffer_updated", "eof", "pending"},
            "LengthPrefixedEncoder": {"encode", "encode_many"},
            "LineDecoder": {"feed", "eof"},
            "LineEncoder": {"encode", "encode_many"},
        },
    ),
    "_outq": ("_outq_py", {"OutQueue": {"append", "extend", "take", "clear", "nbytes"}}),
    "_message": (
        "_message_py",
        {
            "ALL_STATES": set(),
            "Dispatcher": {"session", "run", "reply"},
            "Route": {"type_id", "handler", "decode", "is_async", "allowed", "name"},
            "Session": {"state", "in_flight", "backlog", "failed", "draining", "tasks"},
            "pack_header": set(),
            "encode_message": set(),
            "parse_header": set(),
            "error_body": set(),
            "parse_error_body": set(),
        },
    ),
}


@pytest.fixture(scope="module", params=sorted(PAIRS))
def compiled_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def twin_name(compiled_name: str) -> str:
    return PAIRS[compiled_name][0]


@pytest.fixture(scope="module")
def twin(twin_name: str) -> Api:
    return module_api(importlib.import_module(f"fastnet.{twin_name}"))


@pytest.fixture(scope="module")
def stub(compiled_name: str) -> Api:
    path = STUB_DIR / f"{compiled_name}.pyi"
    assert path.is_file(), f"the stub of the compiled module is missing: {path}"
    return stub_api(path)


@pytest.fixture(scope="module")
def compiled(compiled_name: str) -> Api:
    try:
        module = importlib.import_module(f"fastnet.{compiled_name}")
    except ImportError as exc:
        pytest.fail(
            f"fastnet.{compiled_name} is not built ({exc}); build it (pip install -e ., or "
            "python setup.py build_ext --inplace) or run with --no-c-extensions"
        )
    return module_api(module)


def test_twin_has_public_api(twin: Api, compiled_name: str) -> None:
    # An empty API would make every comparison below pass vacuously.
    expected = PAIRS[compiled_name][1]
    assert set(expected) <= set(twin)
    for name, members in expected.items():
        assert members <= set(twin[name] or {}), name


def test_stub_names_match_twin(stub: Api, twin: Api, compiled_name: str, twin_name: str) -> None:
    assert sorted(stub) == sorted(twin), _diff(
        f"{compiled_name}.pyi", sorted(stub), twin_name, sorted(twin)
    )


def test_stub_signatures_match_twin(
    stub: Api, twin: Api, compiled_name: str, twin_name: str
) -> None:
    for name in sorted(set(stub) & set(twin)):
        assert stub[name] == twin[name], _diff(
            f"{compiled_name}.pyi {name}", stub[name], f"{twin_name} {name}", twin[name]
        )


@pytest.mark.c_extension
def test_compiled_names_match_twin(
    compiled: Api, twin: Api, compiled_name: str, twin_name: str
) -> None:
    assert sorted(compiled) == sorted(twin), _diff(
        compiled_name, sorted(compiled), twin_name, sorted(twin)
    )


@pytest.mark.c_extension
def test_compiled_signatures_match_twin(
    compiled: Api, twin: Api, compiled_name: str, twin_name: str
) -> None:
    # Compiled signatures carry C types, not the twin's annotations: compare
    # names, kinds and defaults only.
    for name in sorted(set(compiled) & set(twin)):
        c, py = _without_annotations(compiled[name]), _without_annotations(twin[name])
        assert c == py, _diff(f"{compiled_name} {name}", c, f"{twin_name} {name}", py)


def test_introspection_sees_a_difference() -> None:
    # The machinery above must notice drift: a stub that renames a parameter
    # and drops a method is different from the class it claims to describe.
    class Reference:
        def __init__(self, spec: int) -> None: ...
        def feed(self, data: bytes, limit: int = 4) -> list[bytes]: ...
        def eof(self) -> list[bytes]: ...

    drifted = ast.parse(
        "class Reference:\n"
        "    def __init__(self, spec: int) -> None: ...\n"
        "    def feed(self, chunk: bytes, limit: int = 4) -> list[bytes]: ...\n"
    ).body[0]
    assert isinstance(drifted, ast.ClassDef)
    reference = _class_members(Reference)
    stubbed = _stub_class_members(drifted, {})
    assert set(reference) == {"__init__", "feed", "eof"}
    assert reference["__init__"] == stubbed["__init__"]
    assert reference["feed"] != stubbed["feed"]
    assert "eof" not in stubbed

"""What the documentation lists matches what the code does.

The close reasons ``Hooks.on_close`` reports are string literals in
``supervisor.py`` (no one table defines them): the reasons found there, the
ones ``CloseInfo``'s docstring lists and the ones the README's Hooks
paragraph names must be the same set.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import fastnet.supervisor
from fastnet.metrics import CloseInfo

README = Path(__file__).resolve().parent.parent / "README.md"


def reasons_in_the_code() -> set[str]:
    """The string literals the supervisor gives as a close reason.

    Those stored in ``self._close_reasons[conn]``, assigned to ``reason``, or
    the default in ``reason or "..."``.
    """
    tree = ast.parse(Path(fastnet.supervisor.__file__).read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            for target in node.targets:
                if (
                    isinstance(target, ast.Subscript)
                    and isinstance(target.value, ast.Attribute)
                    and target.value.attr == "_close_reasons"
                ) or (isinstance(target, ast.Name) and target.id == "reason"):
                    found.add(node.value.value)
        elif (
            isinstance(node, ast.BoolOp)
            and isinstance(node.op, ast.Or)
            and isinstance(node.values[0], ast.Name)
            and node.values[0].id == "reason"
        ):
            found.update(v.value for v in node.values[1:] if isinstance(v, ast.Constant))
    return found


def test_the_close_reasons_found_in_the_code_are_plausible() -> None:
    # Guards the scan itself: it must find the usual reasons.
    assert {"closed", "reset", "handler_error", "frame_error"} <= reasons_in_the_code()


def test_close_info_documents_every_close_reason() -> None:
    assert CloseInfo.__doc__ is not None
    documented = set(re.findall(r"^\s*- ``(\w+)``:", CloseInfo.__doc__, re.MULTILINE))
    assert documented == reasons_in_the_code()


@pytest.mark.skipif(not README.is_file(), reason="README.md is not in this tree")
def test_the_readme_hooks_paragraph_names_every_close_reason() -> None:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"`reason`: (.*?)`fastnet\.metrics\.CloseInfo`", text, re.DOTALL)
    assert match, "the README's Hooks paragraph no longer lists the close reasons"
    # The names, not the words in parentheses that explain some of them.
    listed = set(re.findall(r"`(\w+)`", re.sub(r"\([^()]*\)", "", match.group(1))))
    assert listed == reasons_in_the_code()

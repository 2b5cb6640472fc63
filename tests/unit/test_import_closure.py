"""The measured closure's import scan (sgxvtpm/enclaves/specs.py) finds every import
that can run, whatever the statement it sits in, and none under TYPE_CHECKING."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import sgxvtpm
from sgxvtpm.enclaves import specs

PACKAGE = Path(sgxvtpm.__file__).parent


def _reference(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node, visiting expressions too, but TYPE_CHECKING bodies (the slow walk)."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and specs._is_type_checking(child.test):
            for other in child.orelse:
                yield other
                yield from _reference(other)
            continue
        yield child
        yield from _reference(child)


def _imports(nodes: Iterator[ast.AST]) -> list[str]:
    return [ast.dump(n) for n in nodes if isinstance(n, ast.Import | ast.ImportFrom)]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.name)
def test_the_statement_walk_finds_the_imports_a_walk_of_every_node_finds(path: Path) -> None:
    tree = ast.parse(path.read_bytes())
    found = sorted(_imports(specs._executed_statements(tree.body)))
    assert found == sorted(_imports(_reference(tree)))


SOURCE = '''
import a
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    import hidden
else:
    import shown_else
class C:
    def f(self):
        try:
            import in_try
        except ImportError:
            import in_handler
        finally:
            import in_finally
        with open("x"):
            for _ in ():
                while True:
                    import in_loop
        match self:
            case 1:
                import in_case
'''


def test_imports_in_every_kind_of_body_and_none_under_type_checking() -> None:
    tree = ast.parse(SOURCE)
    names = {a.name for n in specs._executed_statements(tree.body)
             if isinstance(n, ast.Import) for a in n.names}
    assert names == {"a", "shown_else", "in_try", "in_handler", "in_finally", "in_loop",
                     "in_case"}

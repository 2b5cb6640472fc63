"""The measured closure's import scan (sgxvtpm/enclaves/specs.py) finds every import
that can run, whatever the statement it sits in, and none under TYPE_CHECKING."""

from __future__ import annotations

import ast
import json
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


ROOTS = (*specs.ENTRY_MODULES, "sgxvtpm.platform.sim.zygote")


def _cache_file(cache_home: Path) -> Path:
    (path,) = (cache_home / "sgxvtpm").glob("imports-py*.json")
    return path


def test_the_import_cache_gives_the_closure_a_fresh_scan_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    fresh = specs.import_closure(ROOTS)  # nothing cached: every module scanned
    entries = json.loads(_cache_file(tmp_path).read_text())
    assert len(entries) == len(fresh) > 20
    monkeypatch.setattr(specs, "_imports_of", _unreachable)
    assert specs.import_closure(ROOTS) == fresh  # all from the cache, no scan


def test_a_cache_over_its_limit_keeps_only_this_runs_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every process that builds specs reads the whole file (hostd keeps what it
    # parsed): entries of other code versions must not pile up.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    fresh = specs.import_closure(ROOTS)
    path = _cache_file(tmp_path)
    entries = json.loads(path.read_text())
    stale = {f"{i:064x}": ["sgxvtpm.gone"] for i in range(specs._ImportCache.LIMIT)}
    path.write_text(json.dumps({**stale, **entries}))
    monkeypatch.setattr(specs, "_imports_of", _unreachable)  # every entry it needs is there
    assert specs.import_closure(ROOTS) == fresh
    assert json.loads(path.read_text()) == entries
    assert len(entries) <= specs._ImportCache.LIMIT // 2  # room for another version


def _unreachable(*args: object) -> list[str]:
    raise AssertionError("scanned although cached")


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"k": "not a list"}', b"\xff"])
def test_an_unreadable_cache_is_an_empty_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    fresh = specs.import_closure(ROOTS)
    _cache_file(tmp_path).write_bytes(content)
    assert specs.import_closure(ROOTS) == fresh
    assert len(json.loads(_cache_file(tmp_path).read_text())) >= len(fresh)  # rewritten


def test_a_cached_list_belongs_to_the_bytes_it_was_read_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Changing a module's bytes is a miss, never its old import list."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    module = tmp_path / "mod.py"
    module.write_text("import sgxvtpm.wire.k1\n")
    cache = specs._ImportCache.load()
    assert cache.imports_of("sgxvtpm.mod", module) == ["sgxvtpm.wire.k1"]
    cache.save()
    module.write_text("import sgxvtpm.host.hostd\n")
    assert specs._ImportCache.load().imports_of("sgxvtpm.mod", module) == ["sgxvtpm.host.hostd"]


def test_a_cache_that_cannot_be_written_costs_only_the_scan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")  # the cache directory would have to be under a file
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    assert set(specs.import_closure(ROOTS)) >= set(specs.ENTRY_MODULES)
    assert not list(tmp_path.glob(".imports-*")) and blocker.read_text() == ""

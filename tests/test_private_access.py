"""
No private part of the libraries the daemon is built on is used: an
upgrade of txredisapi, Twisted, treq, klein or prometheus_client may
change or remove anything whose name starts with an underscore, silently.

The scan reads the daemon's source (never imports it) and finds:

 - a name starting with an underscore imported from one of them;
 - an attribute starting with an underscore reached from a name imported
   from one of them (C{txredisapi.ConnectionHandler._factory},
   C{reactor._started}, C{Klein()._app}, ...);
 - C{getattr}/C{hasattr}/C{setattr}/C{delattr} with such a name as a
   constant (C{getattr(handler, "_factory", None)});
 - in a class built on one of their classes, C{self._name} that the
   class does not assign itself (inherited private state).

Each rule has a test that feeds it a sample that must be caught, so the
scan cannot pass by finding nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

PACKAGE = Path(__file__).resolve().parent.parent / "userli_postfix"
LIBRARIES = ("txredisapi", "twisted", "treq", "klein", "prometheus_client")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _fromLibrary(module: str | None) -> bool:
    return module is not None and module.split(".")[0] in LIBRARIES


def _root(node: ast.expr) -> ast.expr:
    """The innermost object of C{a.b().c[0].d}: C{a}."""
    while True:
        if isinstance(node, ast.Attribute):
            node = node.value
        elif isinstance(node, ast.Call):
            node = node.func
        elif isinstance(node, ast.Subscript):
            node = node.value
        else:
            return node


def violations(source: str, filename: str = "<sample>") -> list[str]:
    """Every use of a private name of the libraries in C{source}, as text."""
    tree = ast.parse(source, filename)
    found: list[str] = []
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _fromLibrary(alias.name):
                    imported.add(alias.asname or alias.name.split(".")[0])
                    if any(_private(part) for part in alias.name.split(".")):
                        found.append(f"{filename}:{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and _fromLibrary(node.module):
            assert node.module is not None
            if any(_private(part) for part in node.module.split(".")):
                found.append(f"{filename}:{node.lineno}: from {node.module}")
            for alias in node.names:
                imported.add(alias.asname or alias.name)
                if _private(alias.name):
                    found.append(f"{filename}:{node.lineno}: imports {alias.name}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            root = _root(node.value)
            if isinstance(root, ast.Name) and root.id in imported:
                found.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr", "setattr", "delattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and _private(node.args[1].value)
        ):
            found.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.ClassDef):
            found += _inherited(node, imported, filename)
    return found


def _inherited(cls: ast.ClassDef, imported: set[str], filename: str) -> list[str]:
    """C{self._x} in a class built on a library class, where the class never assigns it."""
    external = any(
        isinstance(root := _root(base), ast.Name) and root.id in imported for base in cls.bases
    )
    if not external:
        return []
    assigned: set[str] = set()
    used: list[ast.Attribute] = []
    for node in ast.walk(cls):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "self"
            and _private(node.attr)
        ):
            if isinstance(node.ctx, ast.Store):
                assigned.add(node.attr)
            else:
                used.append(node)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _private(node.name):
            assigned.add(node.name)
        elif isinstance(node, ast.AnnAssign | ast.Assign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            assigned.update(t.id for t in targets if isinstance(t, ast.Name))
    return [
        f"{filename}:{node.lineno}: {ast.unparse(node)} (inherited from a library class)"
        for node in used
        if node.attr not in assigned
    ]


class PrivateAccessTests(SynchronousTestCase):
    """The daemon's source, and the scan itself."""

    def test_daemon_uses_no_private_names(self) -> None:
        """No module of the daemon uses a private name of the libraries."""
        files = sorted(PACKAGE.rglob("*.py"))
        self.assertGreater(len(files), 20)
        found: list[str] = []
        for path in files:
            found += violations(path.read_text(), str(path.relative_to(PACKAGE.parent)))
        self.assertEqual(found, [])

    def test_private_import_found(self) -> None:
        """Importing a private name, or from a private module, is found."""
        self.assertEqual(len(violations("from twisted.application import _client_service")), 1)
        self.assertEqual(len(violations("from twisted.logger._global import x")), 1)
        self.assertEqual(len(violations("import twisted._version")), 1)
        self.assertEqual(violations("from twisted.application.internet import ClientService"), [])

    def test_attribute_of_imported_name_found(self) -> None:
        """A private attribute reached from an imported name is found, however deep."""
        sample = (
            "import txredisapi\n"
            "from twisted.internet import reactor as r\n"
            "from klein import Klein\n"
            "txredisapi.ConnectionHandler(f)._factory.size\n"
            "r._started\n"
            "Klein()._app\n"
            "txredisapi.lazyConnection().handler.pool[0]._private\n"
        )
        self.assertEqual(len(violations(sample)), 4)

    def test_own_private_names_allowed(self) -> None:
        """Private names of the daemon's own are its business."""
        sample = (
            "import txredisapi\n"
            "class Mine:\n"
            "    def __init__(self):\n"
            "        self._pool = txredisapi.lazyConnection()\n"
            "    def go(self):\n"
            "        return self._pool.get('k'), self.__class__\n"
        )
        self.assertEqual(violations(sample), [])

    def test_getattr_constant_found(self) -> None:
        """C{getattr(x, "_factory", None)} is found, whatever x is."""
        self.assertEqual(len(violations('getattr(handler, "_factory", None)')), 1)
        self.assertEqual(len(violations('hasattr(handler, "size")')), 0)

    def test_inherited_private_state_found(self) -> None:
        """In a subclass of a library class, C{self._x} the subclass never assigns is found."""
        sample = (
            "from txredisapi import RedisFactory\n"
            "class Factory(RedisFactory):\n"
            "    def __init__(self):\n"
            "        self._mine = 1\n"
            "    def size(self):\n"
            "        return self._mine + len(self._waitingForEmptyPool)\n"
        )
        found = violations(sample)
        self.assertEqual(len(found), 1)
        self.assertIn("_waitingForEmptyPool", found[0])

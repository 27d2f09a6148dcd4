"""Griffe extension for the docs build: Sphinx roles in docstrings become links.

keybatch's docstrings use Sphinx roles (``:class:`Pending```), which read well in
``help()`` and IDEs. mkdocstrings renders Markdown, so this turns each role into a
mkdocstrings cross-reference (``[`Pending`][keybatch.Pending]``) when the name
resolves to a documented object, and into plain code when it does not.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|meth|func|attr|exc|obj|data|mod):`~?([\w.]+)(?:\(\))?`")


def _public(path: str) -> str:
    # keybatch._processor.Processor.run -> keybatch.Processor.run: every name of a
    # private module is re-exported by the package.
    return re.sub(r"^keybatch\._\w+\.", "keybatch.", path)


class SphinxRoles(griffe.Extension):
    """Rewrite ``:role:`name``` in every docstring of the package."""

    def on_package(
        self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any
    ) -> None:
        collection = loader.modules_collection
        self._walk(pkg, collection, set())

    def _walk(self, obj: griffe.Object, collection: Any, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(
                lambda m: self._link(obj, m.group(1), collection), obj.docstring.value
            )
        for member in obj.members.values():
            if not member.is_alias:
                self._walk(member, collection, seen)  # type: ignore[arg-type]

    @staticmethod
    def _link(obj: griffe.Object, name: str, collection: Any) -> str:
        scopes = []
        scope: Any = obj if obj.is_class or obj.is_module else obj.parent
        while scope is not None:
            scopes.append(scope.path)
            scope = scope.parent
        candidates = [name] + [f"{s}.{name}" for s in scopes] + [f"keybatch.{name}"]
        for path in candidates:
            try:
                collection[path]
            except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
                continue
            return f"[`{name}`][{_public(path)}]"
        return f"`{name}`"

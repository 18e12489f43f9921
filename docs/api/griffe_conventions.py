"""Griffe extension: render this package's docstring conventions in the API reference.

Loaded by mkdocstrings (``extensions`` in ``mkdocs.yml``). It rewrites only the docstring text
that the reference renders, never the package. The docstrings are Google style as Napoleon
reads it; griffe is stricter in four places:

- ``Example:`` (singular, or with a caption: ``Example (a toy problem):``) opens an examples
  section, as in Napoleon; griffe only knows ``Examples:`` and would render the doctest as a
  quoted paragraph.
- Grouped parameters, ``lr, steps: Adam learning rate and iterations.`` (the name list may wrap
  over lines ending in a comma), become one entry per name with the shared description, so each
  name is still checked against the signature and gets its type from the annotation.
- ``Returns:`` is prose (the signature has the type); the whole block becomes the description,
  instead of its first colon splitting a "type" off (``mkdocs.yml`` sets
  ``returns_multiple_items: false``, this adds the empty type).
- Sphinx roles (``:func:`prune```, ``:class:`~torch_qmprune.calibration.InputGram```) become
  links to the documented object when it is on a page of the reference, inline code otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import griffe

_PARAM_SECTIONS = {
    "args", "arguments", "params", "parameters", "keyword args", "keyword arguments",
    "other args", "other arguments", "other params", "other parameters",
}
_RETURN_SECTIONS = {"returns", "return", "yields", "yield"}
_SECTION = re.compile(r"^([A-Za-z][A-Za-z ]*):\s*$")
_EXAMPLE = re.compile(r"^Examples?\s*(?:\((.+)\))?:\s*$")
_NAME = r"\*{0,2}[A-Za-z_]\w*"
_GROUP = re.compile(rf"^({_NAME}(?:\s*,\s*{_NAME})+)\s*(\([^)]*\))?\s*:(.*)$", re.DOTALL)
_PARTIAL = re.compile(rf"^{_NAME}(?:\s*,\s*{_NAME})*\s*,$")
_ROLE = re.compile(r":(?:py:)?(func|meth|class|mod|attr|data|exc|obj|const):`(~?)([\w.]+?)(\(\))?`")
# modules whose public members the reference renders (docs/api/*.md); the rest are private
_PRIVATE_MODULE = re.compile(r"(^|\.)_")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def rewrite(text: str) -> str:
    """``text`` with ``Example:`` renamed, parameter groups split and returns made prose."""
    lines = text.split("\n")
    out: list[str] = []
    section: str | None = None
    item_indent: int | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() and _indent(line) == 0:
            match = _SECTION.match(line)
            section = match.group(1).lower() if match else None
            item_indent = None
            example = _EXAMPLE.match(line)
            if example:  # "Example (what it shows):" -> "Examples:" and the caption as text
                section = "examples"
                out.append("Examples:")
                if example.group(1):
                    caption = example.group(1)
                    out += ["    " + caption[0].upper() + caption[1:] + ":", ""]
            else:
                out.append(line)
            i += 1
            continue
        if not line.strip() or section not in _PARAM_SECTIONS | _RETURN_SECTIONS:
            out.append(line)
            i += 1
            continue
        if section in _RETURN_SECTIONS:
            # first line of the block: an empty type, so the signature's annotation is used
            first = item_indent is None
            item_indent = item_indent if item_indent is not None else _indent(line)
            out.append(" " * item_indent + ": " + line.strip() if first else line)
            i += 1
            continue
        if item_indent is None:
            item_indent = _indent(line)
        if _indent(line) != item_indent:
            out.append(line)
            i += 1
            continue
        # a parameter: its header may wrap over lines that end in a comma (a long name list)
        head, j = line.strip(), i + 1
        while _PARTIAL.match(head) and j < len(lines) and lines[j].strip():
            head += " " + lines[j].strip()
            j += 1
        match = _GROUP.match(head)
        if not match:
            out.append(line)
            i += 1
            continue
        body = []
        while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > item_indent):
            body.append(lines[j])
            j += 1
        while body and not body[-1].strip():
            j -= 1
            body.pop()
        kind = f" {match.group(2)}" if match.group(2) else ""
        for name in (name.strip() for name in match.group(1).split(",")):
            out.append(" " * item_indent + f"{name}{kind}:{match.group(3)}")
            out.extend(body)
        i = j
    return "\n".join(out)


def _walk(obj: griffe.Object) -> Iterator[griffe.Object]:
    yield obj
    for member in obj.members.values():
        if not member.is_alias and (member.is_module or member.is_class or member.is_function
                                    or member.is_attribute):
            yield from _walk(member)


def _final(obj: Any) -> Any:
    try:
        return obj.final_target if obj.is_alias else obj
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def _rendered(obj: Any) -> bool:
    """Whether the reference has an anchor for ``obj`` (public, documented, public module)."""
    if obj is None or obj.docstring is None or obj.is_module:
        return False
    module = obj.module.path
    return "." in module and not _PRIVATE_MODULE.search(module) and not any(
        part.startswith("_") for part in obj.path[len(module) + 1:].split("."))


class GoogleConventions(griffe.Extension):
    """Apply :func:`rewrite` to every docstring, then turn Sphinx roles into cross-references."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        by_name: dict[str, list[griffe.Object]] = {}
        objects = list(_walk(pkg))
        for obj in objects:
            if obj.parent is not None and obj.parent.is_module and _rendered(obj):
                by_name.setdefault(obj.name, []).append(obj)

        def lookup(scope: griffe.Object, target: str) -> Any:
            if target.startswith(pkg.name + "."):
                try:
                    return _final(pkg.modules_collection[target])
                except KeyError:
                    return None
            head, _, rest = target.partition(".")
            node: Any = scope
            while node is not None:  # the object, its class, its module, the package
                if head in node.members:
                    found = _final(node.members[head])
                    for part in rest.split(".") if rest else ():
                        found = _final(found.members.get(part)) if found is not None else None
                    return found
                node = node.parent
            if not rest and head in pkg.members:  # the top-level API, qmprune.<name>
                return _final(pkg.members[head])
            if not rest and len(by_name.get(head, [])) == 1:
                return by_name[head][0]
            return None

        for obj in objects:
            if obj.docstring is None or ":`" not in obj.docstring.value:
                continue

            def link(match: re.Match[str], obj: griffe.Object = obj) -> str:
                _, tilde, target, call = match.groups()
                shown = (target.rsplit(".", 1)[-1] if tilde else target) + (call or "")
                try:
                    found = lookup(obj, target)
                except (griffe.AliasResolutionError, griffe.CyclicAliasError, AttributeError):
                    found = None
                if _rendered(found):
                    return f"[`{shown}`][{found.path}]"
                return f"`{shown}`"

            obj.docstring.value = _ROLE.sub(link, obj.docstring.value)

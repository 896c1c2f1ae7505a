"""Griffe extension for the docs build: render the package's reStructuredText bits.

The docstrings are Google style (parsed by mkdocstrings), with Sphinx's math and
cross-reference syntax inside. This extension rewrites, before rendering:

* ``.. math::`` blocks into ``$$ ... $$`` (pymdownx.arithmatex, KaTeX); blocks with
  ``&`` alignment markers are wrapped in ``aligned``, as Sphinx wraps them in ``split``;
* ``text::`` before a literal block into ``text:`` (the block is indented code already);
* ``:math:`x``` into ``\\(x\\)``;
* ``:class:``, ``:func:``, ``:meth:``, ``:mod:``, ``:attr:``, ``:exc:``, ``:data:``
  into optional autorefs links when the target is part of the documented package (and
  into inline code otherwise), so an unknown target never breaks ``--strict``.

The package's modules are not touched: only the in-memory docstrings of the build.
It lives under ``docs/_ext`` (excluded from the site) and is loaded from mkdocs.yml.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_MATH_DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*$")
_LITERAL_INTRO = re.compile(r"(?<=[^\s:.])::(?=[ \t]*\n[ \t]*\n[ \t]+\S)")
_MATH_ROLE = re.compile(r":math:`(?P<body>[^`]+)`")
_XREF_ROLE = re.compile(
    r":(?:py:)?(?P<role>class|func|meth|mod|attr|exc|data|obj):`(?P<target>[^`]+)`"
)


def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip())


def _one_line(tex: str) -> str:
    return re.sub(r"[ \t]*\n[ \t]*", " ", tex)


def _math_blocks(text: str) -> str:
    """Turn every ``.. math::`` directive into a ``$$`` display block."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _MATH_DIRECTIVE.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent = match["indent"]
        base = len(indent)
        i += 1
        body: list[str] = []
        while i < len(lines) and (not lines[i].strip() or _indent_of(lines[i]) > base):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():  # the blank lines after the block
            i -= 1
            body.pop()
        content = [line for line in body if line.strip()]
        strip = min((_indent_of(line) for line in content), default=0)
        content = [line[strip:] for line in content]
        if any("&" in line for line in content):
            content = ["\\begin{aligned}", *content, "\\end{aligned}"]
        # mdx_truly_sane_lists (nested_indent: 2) dedents a list item's blocks by 2 per
        # level, and arithmatex takes a `$$` block only from column 0 after that: the
        # 3-space indent under a `1. ` item would leave raw `$$` in a paragraph.
        if indent.strip(" ") == "" and base % 2:
            indent = indent[:-1]
        out.append(f"{indent}$$")
        out.extend(f"{indent}{line}" for line in content)
        out.append(f"{indent}$$")
    return "\n".join(out)


_BULLET = re.compile(r"^[ \t]*\* ")
_ITEM = re.compile(r"^[ \t]*(?:[*+-]|\d+\.) ")


def _list_breaks(text: str) -> str:
    """A blank line before a ``* `` bullet that follows a paragraph.

    RST ends an indented paragraph (e.g. an item's second paragraph) where a less
    indented bullet starts; Markdown needs a blank line there, or it runs the bullets
    into the paragraph.
    """
    out: list[str] = []
    block_first: str | None = None  # first line of the current block of text
    in_math = False
    for line in text.split("\n"):
        if line.strip() == "$$":
            in_math = not in_math
        elif not in_math and _BULLET.match(line) and block_first is not None:
            if not _ITEM.match(block_first) and not block_first.lstrip().startswith(">>>"):
                out.append("")
                block_first = None
        out.append(line)
        if not line.strip():
            block_first = None
        elif block_first is None:
            block_first = line
    return "\n".join(out)


_SECTION = re.compile(
    r"^(?P<indent>[ \t]*)(?:Args|Arguments|Params|Parameters|Attributes|Keyword Args|"
    r"Keyword Arguments|Other Parameters):[ \t]*$"
)
_EXAMPLE = re.compile(r"^(?P<indent>[ \t]*)Example:[ \t]*$")
_NAMES = re.compile(r"^\**[A-Za-z_]\w*(?:\s*,\s*\**[A-Za-z_]\w*)+$")


def _sections(text: str) -> str:
    """Google-style fixes that Napoleon accepts but griffe does not.

    ``Example:`` becomes ``Examples:`` (griffe would render it as an admonition, the
    ``>>>`` lines as block quotes), and an ``a, b, c: description`` item of an
    ``Args:`` or ``Attributes:`` section (possibly wrapped after a comma) becomes one
    item per name, so that each name is matched to the signature.
    """
    lines = [_EXAMPLE.sub(r"\g<indent>Examples:", line) for line in text.split("\n")]
    out: list[str] = []
    i = 0
    while i < len(lines):
        out.append(lines[i])
        header = _SECTION.match(lines[i])
        i += 1
        if not header:
            continue
        start = i
        while start < len(lines) and not lines[start].strip():
            start += 1
        if start == len(lines) or _indent_of(lines[start]) <= len(header["indent"]):
            continue
        item_indent = _indent_of(lines[start])
        # The section's items: (first line, continuation lines).
        items: list[tuple[str, list[str]]] = []
        j = start
        while j < len(lines) and (not lines[j].strip() or _indent_of(lines[j]) >= item_indent):
            line = lines[j]
            if line.strip() and _indent_of(line) == item_indent:
                first = line.strip()
                while first.endswith(",") and ":" not in first and j + 1 < len(lines):
                    j += 1
                    first = f"{first} {lines[j].strip()}"
                items.append((first, []))
            elif items:
                items[-1][1].append(line)
            j += 1
        trailing: list[str] = []
        while items and items[-1][1] and not items[-1][1][-1].strip():
            trailing.insert(0, items[-1][1].pop())
        pad = " " * item_indent
        for first, rest in items:
            name, sep, description = first.partition(":")
            if sep and _NAMES.match(name.strip()):
                for one in (n.strip() for n in name.split(",")):
                    out.append(f"{pad}{one}:{description}")
                    out.extend(rest)
            else:
                out.append(f"{pad}{first}")
                out.extend(rest)
        out.extend(trailing)
        i = j
    return "\n".join(out)


class RstToMarkdown(griffe.Extension):
    """Rewrite Sphinx math and cross-reference roles in every docstring of a package."""

    def __init__(self) -> None:
        super().__init__()
        self._package: griffe.Module | None = None

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self._package = pkg
        self._visit(pkg)

    def _visit(self, obj: griffe.Object) -> None:
        if obj.docstring is not None:
            obj.docstring.value = self._convert(obj.docstring.value, obj)
        for member in obj.members.values():
            if not member.is_alias:
                self._visit(member)

    def _resolve(self, target: str, obj: griffe.Object) -> str | None:
        """The documented object's path that ``target`` names, seen from ``obj``."""
        assert self._package is not None
        root = self._package.path
        scopes = [""]
        parent: griffe.Object | None = obj
        while parent is not None:
            scopes.append(parent.path + ".")
            parent = parent.parent
        for scope in scopes:
            path = scope + target
            if path != root and not path.startswith(root + "."):
                continue
            try:
                found = self._package[path[len(root) + 1 :]] if path != root else self._package
            except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
                continue
            if found.is_alias:  # a re-export: link to where it is documented
                try:
                    return found.final_target.path
                except (griffe.AliasResolutionError, griffe.CyclicAliasError):
                    return path
            return found.path
        return None

    def _xref(self, match: re.Match[str], obj: griffe.Object) -> str:
        target = match["target"].strip()
        short = target.startswith("~")
        target = target.lstrip("~.")
        if "<" in target and target.endswith(">"):  # :class:`title <target>`
            title, target = (s.strip() for s in target[:-1].split("<", 1))
        else:
            title = target.rsplit(".", 1)[-1] if short else target
        if match["role"] in ("func", "meth"):
            title += "()"
        resolved = self._resolve(target, obj)
        if resolved is None:
            return f"`{title}`"
        return f'<autoref identifier="{resolved}" optional><code>{title}</code></autoref>'

    def _convert(self, text: str, obj: griffe.Object) -> str:
        text = _list_breaks(_sections(_math_blocks(text)))
        text = _LITERAL_INTRO.sub(":", text)  # "way::" + indented block: RST shows "way:"
        # One line per formula: a wrapped line starting with "+ " or "- " is no list item.
        text = _MATH_ROLE.sub(lambda m: f"\\({_one_line(m['body'])}\\)", text)
        return _XREF_ROLE.sub(lambda m: self._xref(m, obj), text)

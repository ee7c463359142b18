"""Docs true to the tree: every file, module or name the documentation, a docstring or a comment
cites exists.

Read: docs/*.md, README.md, bench/README.md, and every Python file under agents/, broker/, rbac/,
bench/ and tests/ (its strings, docstrings included, and its comments); for paths also the Makefile,
pyproject.toml, .ci/run and every file under deploy/. Checked: a path from the top of the repository
(``agents/ops.py``, ``deploy/workflows/*.yaml``); a bare file name (``devices.py``: some file of the
repository has that name); a dotted module name (``agents.authz.broker_only``: the module exists); a
docstring's cross-reference to a class, function or attribute; and the README's layout against the
modules of agents/. Issue numbers are history, not documentation: none may appear.
"""

from __future__ import annotations

import ast
import importlib
import io
import os
import re
import tokenize
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOPS = ("agents", "broker", "rbac", "deploy", "bench", "tests", "docs", ".ci")
CODE = ("agents", "broker", "rbac", "bench", "tests")
NOT_THE_TREE = {".git", ".venv", ".vertebra", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache",
                "build"}

# Cited on purpose though not in the repository: what running something makes.
# Paths that exist only once something has run: everything the benchmarks write under bench/results/
# (ignored by git, so a fresh clone has none of it).
MADE_BY_RUNNING_UNDER = ("bench/results",)
NAMES_MADE_BY_RUNNING = {
    "mesh.yaml",  # the state directory's mesh file, created from deploy/mesh.example.yaml
}
# A dotted name whose last part is one of these is a file name (broker.sqlite), not a module.
FILE_SUFFIXES = {"sqlite", "db", "yaml", "json", "toml", "log", "sock", "pem", "key", "txt"}

PATH = re.compile(r"(?<![\w./-])((?:" + "|".join(re.escape(t) for t in TOPS) + r")/[\w.*/-]*\w)")
BARE = re.compile(r"(?<![\w./{}$-])([\w-]+\.(?:py|md|yaml|toml|sh|lua|json|cfg))\b(?![/\w])")
DOTTED = re.compile(r"(?<![\w./-])((?:agents|broker|rbac)(?:\.\w+)+)")
ISSUE = re.compile(r"\bissues?\s*#?\d+|(?<![\w&/#])#\d+\b", re.IGNORECASE)
DOC_ISSUE = re.compile(r"\bissues?\s*#?\d+", re.IGNORECASE)  # Markdown uses a bare # and a number itself


def _python_files() -> list[Path]:
    return sorted(p for top in CODE for p in (ROOT / top).rglob("*.py") if not NOT_THE_TREE & set(p.parts))


def _docs() -> list[Path]:
    return sorted([*(ROOT / "docs").glob("*.md"), ROOT / "README.md", ROOT / "bench" / "README.md"])


def _setup_files() -> list[Path]:
    """What sets the project up and runs it: their comments and messages name files too."""
    deploy = [p for p in (ROOT / "deploy").rglob("*") if p.is_file() and not NOT_THE_TREE & set(p.parts)]
    return sorted([ROOT / "Makefile", ROOT / "pyproject.toml", ROOT / ".ci" / "run", *deploy])


def _prose(path: Path) -> Iterator[tuple[int, str]]:
    """(line, text) of a Python file's comments and of its strings that are docstrings or stand alone."""
    tokens = list(tokenize.generate_tokens(io.StringIO(path.read_text()).readline))
    for i, tok in enumerate(tokens):
        if tok.type == tokenize.COMMENT:
            yield tok.start[0], tok.string
        elif tok.type == tokenize.STRING:
            before = next((t for t in reversed(tokens[:i]) if t.type not in (tokenize.NL, tokenize.COMMENT)), None)
            if before is None or before.type in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
                yield tok.start[0], tok.string  # a docstring, or a string standing as a statement


def _strings(path: Path) -> Iterator[tuple[int, str]]:
    """(line, text) of every string and comment of a Python file: messages name files too."""
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type in (tokenize.STRING, tokenize.COMMENT):  # an f-string is one STRING token up to 3.11
            yield tok.start[0], tok.string


def _doc_lines(path: Path) -> Iterator[tuple[int, str]]:
    yield from enumerate(path.read_text(errors="replace").splitlines(), start=1)


def _where(path: Path, line: int, text: str = "", at: int = 0) -> str:
    """path:line of the character ``at`` of ``text``, which starts on ``line`` of ``path``."""
    return f"{path.relative_to(ROOT)}:{line + text.count(chr(10), 0, at)}"


def _all_texts(prose_only: bool) -> Iterator[tuple[Path, int, str]]:
    for doc in _docs() if prose_only else [*_docs(), *_setup_files()]:
        for line, text in _doc_lines(doc):
            yield doc, line, text
    for source in _python_files():
        for line, text in (_prose(source) if prose_only else _strings(source)):
            yield source, line, text


def _file_names() -> set[str]:
    names = set()
    for _top, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in NOT_THE_TREE]
        names.update(dirs, files)
    return names


def test_cited_paths_exist() -> None:
    missing = []
    for source, line, text in _all_texts(prose_only=False):
        for m in PATH.finditer(text):
            cited = m.group(1)
            if any(cited == d or cited.startswith(d + "/") for d in MADE_BY_RUNNING_UNDER):
                continue
            found = any(ROOT.glob(cited)) if "*" in cited else (ROOT / cited).exists()
            if not found:
                missing.append(f"{_where(source, line, text, m.start())} cites {cited}")
    assert not missing, "files cited that do not exist (fix the citation or the tree):\n" + "\n".join(missing)


def test_cited_file_names_exist() -> None:
    names = _file_names() | NAMES_MADE_BY_RUNNING
    missing = [f"{_where(source, line, text, m.start())} cites {m.group(1)}"
               for source, line, text in _all_texts(prose_only=True)
               for m in BARE.finditer(text) if m.group(1) not in names]
    assert not missing, "file names cited that no file of the repository has:\n" + "\n".join(missing)


def _is_module(dotted: str) -> bool:
    package, name = dotted.split(".")[:2]
    if name in FILE_SUFFIXES:
        return True  # broker.sqlite: a file the broker writes, not a module
    base = ROOT / package / name
    # rbac.Gate: a name the package itself exports
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists() or \
        hasattr(importlib.import_module(package), name)


def test_cited_modules_exist() -> None:
    missing = [f"{_where(source, line, text, m.start())} cites {m.group(1)}"
               for source, line, text in _all_texts(prose_only=True)
               for m in DOTTED.finditer(text) if not _is_module(m.group(1))]
    assert not missing, "modules cited that do not exist:\n" + "\n".join(missing)


def test_no_issue_numbers_in_docstrings_or_comments() -> None:
    found = [f"{_where(source, line, text, m.start())}: {m.group(0)!r}"
             for source in _python_files() for line, text in _prose(source) for m in ISSUE.finditer(text)]
    assert not found, "issue numbers in a docstring or comment (say what the code does, not its history):\n" + \
        "\n".join(found)


def test_no_issue_numbers_in_docs() -> None:
    found = [f"{_where(doc, line)}: {m.group(0)!r}"
             for doc in [*_docs(), *_setup_files()] for line, text in _doc_lines(doc) for m in DOC_ISSUE.finditer(text)]
    assert not found, "issue numbers in the documentation:\n" + "\n".join(found)


ROLE = re.compile(r":(?:class|meth|func|attr|exc|data):`~?([\w.]+)`")


def _defined_names() -> set[str]:
    """Every class, function, method, module and assigned name or attribute of the code."""
    names = set()
    for source in _python_files():
        names.add(source.stem)
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.arg):
                names.add(node.arg)  # a dataclass field or a constructor's keyword
    return names | {"agents", "broker", "rbac"}


def test_cross_references_name_what_exists() -> None:
    """A docstring's cross-references (the class, meth, func, attr and exc roles) name a class,
    function or attribute that exists: a renamed or removed one leaves them pointing nowhere."""
    names = _defined_names()
    missing = [f"{_where(source, line, text, m.start())} refers to {m.group(1)}"
               for source, line, text in _all_texts(prose_only=True) for m in ROLE.finditer(text)
               if not set(m.group(1).split(".")) <= names]
    assert not missing, "cross-references to names the code does not define:\n" + "\n".join(missing)


def _layout() -> list[str]:
    """The code block of the README's "How it fits together"."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## How it fits together", 1)[1]
    return section.split("```", 2)[1].splitlines()


def test_readme_layout_matches_agents() -> None:
    """Every module the README's layout lists under agents/ exists there, and every module of agents/
    is listed: someone new finds each one, and what it is for, in one place."""
    listed = {m.group(1) for line in _layout() if (m := re.match(r"  ([\w]+\.py) ", line))}
    present = {p.name for p in (ROOT / "agents").glob("*.py")} - {"__init__.py"}
    assert not listed - present, f"the README's layout lists modules agents/ does not have: {sorted(listed - present)}"
    assert not present - listed, f"modules of agents/ the README's layout does not list: {sorted(present - listed)}"
    for kind in ("storage", "fencing", "monitor"):
        assert any(f"{kind}/" in line for line in _layout()), f"the README's layout does not name agents/{kind}/"

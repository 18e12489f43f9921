"""The documentation site builds with ``mkdocs build --strict`` and its API reference is real.

The site (``mkdocs.yml``: the pages of ``docs/`` plus an API reference generated from the
docstrings by mkdocstrings) must build without a single warning: broken links between pages,
links to missing anchors, docstrings griffe cannot parse and unresolved cross-references all
fail the build. The links of README.md and of every page must point at files that exist.
"""

from __future__ import annotations

import html
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")

# public name -> (API page, anchor: where mkdocstrings renders its docstring)
KEY_NAMES = {
    "prune": ("api/pruning", "torch_qmprune.structural.prune"),
    "SpectralImportance": ("api/pruning", "torch_qmprune.importance.SpectralImportance"),
    "redundancy_graph": ("api/graph", "torch_qmprune.graph.redundancy_graph"),
    "RedundancyGraph": ("api/graph", "torch_qmprune.graph.RedundancyGraph"),
    "spectral_state": ("api/spectral", "torch_qmprune.spectral.states.spectral_state"),
    "spectral_structured": ("api/methods", "torch_qmprune.methods.spectral_structured"),
}


def _text(markup: str) -> str:
    """Visible text of HTML, or of a docstring's RST inline markup, without any whitespace."""
    text = re.sub(r":[a-z]+:`~?([\w.]+)`", lambda m: m.group(1), markup)
    text = html.unescape(re.sub(r"<[^>]+>", " ", text)).replace("`", "")
    return "".join(text.split())


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
         str(ROOT / "mkdocs.yml"), "--site-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    return proc, out


def test_site_builds_strict_without_warnings(site):
    proc, out = site
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "WARNING" not in log, log[-4000:]
    assert (out / "index.html").exists()
    for page in ["quickstart", "guide", "migration", "theory", "results/demo", "results/table1",
                 "api/spectral", "api/graph", "api/cli"]:
        assert (out / page / "index.html").exists(), page


@pytest.mark.parametrize("name", sorted(KEY_NAMES))
def test_api_pages_render_docstrings(site, name):
    import torch_qmprune

    proc, out = site
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    page, anchor = KEY_NAMES[name]
    markup = (out / page / "index.html").read_text(encoding="utf-8")
    assert f'id="{anchor}"' in markup, f"{anchor} has no heading on {page}"
    section = markup[markup.index(f'id="{anchor}"'):]
    summary = inspect.getdoc(getattr(torch_qmprune, name)).split("\n\n")[0]
    assert _text(summary) in _text(section[:20000])
    # Google-style sections are parsed, doctests are code blocks, not quoted paragraphs
    assert "doc-section-title" in section[:60000]


def test_api_reference_cross_references_are_links(site):
    proc, out = site
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    pages = list((out / "api").rglob("index.html"))
    assert len(pages) >= 11
    for page in pages:
        markup = page.read_text(encoding="utf-8")
        assert ":func:" not in markup and ":class:" not in markup, page
        assert "&gt;&gt;&gt;" not in re.sub(r"<pre>.*?</pre>", "", markup, flags=re.S), page
    policy = (out / "api" / "policy" / "index.html").read_text(encoding="utf-8")
    assert 'href="#torch_qmprune.policy.train_policy"' in policy


def _relative_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    links = [m.group(1) for m in _LINK.finditer(text)]
    return [link.split("#")[0] for link in links
            if not re.match(r"^[a-z]+:", link) and not link.startswith("#")]


@pytest.mark.parametrize("source", ["README.md", *sorted(
    str(p.relative_to(ROOT)) for p in DOCS.rglob("*.md"))])
def test_markdown_links_resolve(source):
    path = ROOT / source
    missing = [link for link in _relative_links(path) if not (path.parent / link).exists()]
    assert not missing, f"{source} links to missing files: {missing}"


def _conventions():
    pytest.importorskip("griffe")
    spec = importlib.util.spec_from_file_location(
        "griffe_conventions", DOCS / "api" / "griffe_conventions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docstring_conventions_rewrite():
    rewrite = _conventions().rewrite
    text = ("Do it.\n\nArgs:\n    a, b: two states.\n        More.\n    c: one.\n"
            "    steps, seed,\n        lr: options.\n\nReturns:\n    ``(x, y)``: a pair.\n\n"
            "Example:\n    >>> 1\n    1")
    assert rewrite(text) == (
        "Do it.\n\nArgs:\n    a: two states.\n        More.\n    b: two states.\n        More.\n"
        "    c: one.\n    steps: options.\n    seed: options.\n    lr: options.\n\nReturns:\n"
        "    : ``(x, y)``: a pair.\n\nExamples:\n    >>> 1\n    1")
    captioned = rewrite("Example (a toy):\n    >>> 1\n    1")
    assert captioned == "Examples:\n    A toy:\n\n    >>> 1\n    1"

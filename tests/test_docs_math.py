"""The docs site's maths renders offline in a real browser (docs/check_math.py)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "docs" / "check_math.py"

_spec = importlib.util.spec_from_file_location("check_math", SCRIPT)
check_math = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = check_math  # dataclasses look their module up
_spec.loader.exec_module(check_math)


def _audit(dom: str):
    audit = check_math.DomAudit()
    audit.feed(dom)
    audit.close()
    return audit


def test_dom_audit_tells_typeset_from_raw_maths():
    typeset = (
        '<p>with <span class="arithmatex"><span class="katex"><span class="katex-mathml">'
        '<math><semantics><mi>x</mi><annotation encoding="application/x-tex">\\(x\\)'
        "</annotation></semantics></math></span></span></span> and</p>"
        '<div class="arithmatex"><span class="katex-display"><span class="katex">'
        '<svg><path d="M0 0"></path></svg></span></span></div><br><p>$ in text</p>'
    )
    audit = _audit(typeset)
    assert [m.rendered for m in audit.maths] == [True, True]
    assert [m.display for m in audit.maths] == [False, True]
    assert audit.errors == [] and audit.leftovers == []

    raw = (
        '<p><span class="arithmatex">\\(\\theta_{t+1}\\)</span></p><p>$$ a = b $$</p>'
        "<pre><code>$$ in code is fine</code></pre>"
        '<span class="arithmatex"><span class="katex-error" title="ParseError: x">'
        "\\foo</span></span>"
    )
    audit = _audit(raw)
    assert [m.rendered for m in audit.maths] == [False, False]
    assert audit.maths[0].raw == "\\(\\theta_{t+1}\\)"
    assert audit.errors == ["ParseError: x"]
    assert len(audit.leftovers) == 2  # the \( of the raw span and the $$ paragraph


@pytest.mark.skipif(check_math.find_chromium() is None, reason="chromium is not installed")
@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None, reason='mkdocs is not installed (".[docs]")'
)
@pytest.mark.slow
def test_docs_maths_render_offline_in_chromium():
    """Build the site, open the sampler pages (and others) offline, check every formula."""
    run = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, cwd=REPO, timeout=600
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "api/samplers/sghmc/:" in run.stdout and ", 0 failures" in run.stdout

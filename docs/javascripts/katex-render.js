// Typesets the maths of pymdownx.arithmatex (generic mode) with the KaTeX bundled in
// javascripts/katex/ (see PROVENANCE.txt there): nothing is loaded from the network.
//
// arithmatex writes inline maths as <span class="arithmatex">\(...\)</span> and display
// maths as <div class="arithmatex">\[...\]</div>; the docstrings' :math: roles and
// .. math:: blocks reach it through docs/_ext/rst_to_markdown.py.
(function () {
  "use strict";

  var DELIMITED = /^\\[(\[]([\s\S]*)\\[)\]]$/;

  function typeset(root) {
    var elements = root.querySelectorAll(".arithmatex");
    for (var i = 0; i < elements.length; i++) {
      var element = elements[i];
      var match = DELIMITED.exec(element.textContent.trim());
      if (!match) continue; // already typeset, or not arithmatex's output
      katex.render(match[1], element, {
        displayMode: element.tagName === "DIV",
        // A formula KaTeX cannot parse shows as red source (class katex-error) instead
        // of stopping the page; docs/check_math.py fails on any.
        throwOnError: false,
        // `\\` breaks a line in a display formula, as in MathJax; LaTeX would ignore it.
        strict: function (code) {
          return code === "newLineInDisplayMode" ? "ignore" : "warn";
        }
      });
    }
  }

  // mkdocs-material emits document$ for every page, also under instant navigation.
  if (typeof document$ !== "undefined") {
    document$.subscribe(function () { typeset(document.body); });
  } else {
    document.addEventListener("DOMContentLoaded", function () { typeset(document.body); });
  }
})();

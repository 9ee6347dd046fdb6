"""No two modules of u2s import each other, directly or around a loop, lazily or for type checking only."""

from __future__ import annotations

from pathlib import Path

import u2s
from u2s.testing.import_cycles import cycles, import_graph

PACKAGE = Path(u2s.__file__).parent


def test_u2s_has_no_import_cycles():
    found = cycles(import_graph(PACKAGE))
    assert found == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_lazy_and_type_checking_imports_count_and_a_package_may_import_its_own_modules(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg.a import A\nfrom pkg import sub\n")
    (pkg / "a.py").write_text("from pkg.sub.b import helper\n\nclass A: ...\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from pkg.sub.c import f\n"
    )
    (pkg / "sub" / "c.py").write_text("def f():\n    from ..a import A\n")  # relative, lazy: a -> b -> c -> a
    (pkg / "leaf.py").write_text("import os\nimport pkg.sub\n")
    graph = import_graph(pkg)
    assert graph["pkg"] == set()  # its own submodules
    assert graph["pkg.sub.c"] == {"pkg.a"} and graph["pkg.leaf"] == {"pkg.sub"}
    assert cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.sub.c"]]

"""No import cycle anywhere in the ember package (the layers themselves are import-linter's, in `make lint`).

A cycle is the message that a shared piece belongs a layer down (STYLE.md): this test names every
cycle as its modules, found statically by grimp (import-linter's own graph library).
"""

from __future__ import annotations

import grimp


def test_the_package_has_no_import_cycle() -> None:
    graph = grimp.build_graph("ember")
    cycles: set[tuple[str, ...]] = set()
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            back = graph.find_shortest_chain(importer=imported, imported=module)
            if back:
                cycles.add((module, *back))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in sorted(cycles))

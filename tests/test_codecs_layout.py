"""The codecs package is pure codec work: it imports nothing else of the
archive, so ingest, retrieval, the servers and the benchmarks can all use it
without an import cycle (DESIGN "Layout")."""

from __future__ import annotations

import grimp


def test_the_codecs_package_imports_nothing_else_of_the_archive() -> None:
    graph = grimp.build_graph("archive")
    package = "archive.codecs"
    modules = {package, *graph.find_descendants(package)}
    outside = {
        (module, imported)
        for module in modules
        for imported in graph.find_modules_directly_imported_by(module)
        if imported.split(".")[0] == "archive" and imported not in modules
    }
    assert len(modules) > 5  # the graph did see the package's modules
    assert outside == set()

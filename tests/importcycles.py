"""An import-linter contract type: no import cycles between modules.

import-linter's own ``acyclic_siblings`` squashes each subpackage into one
node, so it reports a package that holds both a low module (``security.scope``)
and a high one (``security.http``) as a cycle even when no module imports
itself back.  DESIGN.md asks for no cycles between *modules*; this contract
finds each strongly connected group of modules under ``containers`` and shows
one shortest cycle of it with the lines that make it.

Used from ``[tool.importlinter]`` in pyproject.toml (``contract_types``);
lint-imports puts the working directory on ``sys.path``, so this module is
found as ``tests.importcycles`` when it runs at the repository root.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

import grimp
from importlinter.application import contract_utils, output
from importlinter.application.contract_utils import AlertLevel
from importlinter.domain import fields
from importlinter.domain.contract import Contract, ContractCheck


class AcyclicModulesContract(Contract):
    """No module under ``containers`` reaches itself through imports.

    ``ignore_imports`` (the usual import-linter expressions) declares a known
    exception; it must match an import that exists, or the contract errs.
    """

    type_name = "acyclic_modules"

    containers = fields.ListField(subfield=fields.StringField())
    ignore_imports = fields.SetField(subfield=fields.ImportExpressionField(), required=False)
    unmatched_ignore_imports_alerting = fields.EnumField(AlertLevel, default=AlertLevel.ERROR)

    def check(self, graph: grimp.ImportGraph, verbose: bool) -> ContractCheck:
        removal = contract_utils.remove_ignored_imports_and_report(
            graph=graph,
            ignore_imports=self.ignore_imports,  # type: ignore[arg-type]
            unmatched_alerting=self.unmatched_ignore_imports_alerting,  # type: ignore[arg-type]
        )
        roots = tuple(self.containers)  # type: ignore[arg-type]
        modules = {m for m in graph.modules if any(m == r or m.startswith(r + ".") for r in roots)}

        def successors(module: str) -> list[str]:
            return sorted(graph.find_modules_directly_imported_by(module) & modules)

        cycles = []
        for group in _strongly_connected(sorted(modules), successors):
            cycle = _shortest_cycle(min(group), successors, set(group))
            cycles.append(
                [
                    (importer, imported, _lines(graph, importer, imported))
                    for importer, imported in zip(cycle, cycle[1:], strict=False)
                ]
            )
        output.verbose_print(verbose, f"{len(cycles)} import cycle(s) among {len(modules)} modules")
        return ContractCheck(
            kept=not cycles,
            warnings=list(removal.warnings),
            ignored_import_count=removal.ignored_import_count,
            metadata={"cycles": cycles},
        )

    def render_broken_contract(self, check: ContractCheck) -> None:
        for cycle in check.metadata["cycles"]:
            output.print_error(f"Import cycle through {cycle[0][0]}:")
            for importer, imported, lines in cycle:
                output.print_error(f"- {importer} -> {imported} (l. {lines})")
            output.new_line()


def _lines(graph: grimp.ImportGraph, importer: str, imported: str) -> str:
    details = graph.get_import_details(importer=importer, imported=imported)
    return ", ".join(str(d["line_number"]) for d in details) or "?"


def _strongly_connected(
    nodes: Iterable[str], successors: Callable[[str], list[str]]
) -> list[list[str]]:
    """Tarjan's algorithm, iterative (an import chain can be deeper than the
    recursion limit); only groups of two or more modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(successors(start)))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(successors(child))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return groups


def _shortest_cycle(
    start: str, successors: Callable[[str], list[str]], group: set[str]
) -> list[str]:
    """The shortest path start -> ... -> start inside one strongly connected group."""
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in successors(node):
            if child not in group:
                continue
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [start, *reversed(path[:-1]), start]
            if child not in came_from:
                came_from[child] = node
                queue.append(child)
    raise AssertionError(f"{start} is in a strongly connected group but on no cycle")

"""Which part of edge_agent may import which: the layers, bottom first.

A module may import from its own entry and from entries of lower layers, never from a higher
layer nor from a sibling entry of its own layer (siblings are independent of each other). An entry
names a package or a module; the longest entry that names a module is its entry, so one module
can sit apart from its package (the loggers below everything, the command lines on top).
Every import counts, the lazy ones inside functions too. tests/test_lint.py checks the whole
package against this table, and docs/architecture.md shows it (kept equal by the
same test). Nothing imports this module at run time.
"""

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundation", ("edge_agent", "edge_agent.errors", "edge_agent._proto", "edge_agent.layers")),
    ("shared", ("edge_agent.settings", "edge_agent.common", "edge_agent.observability.logging")),
    (
        "mechanisms",
        (
            "edge_agent.scheduling",
            "edge_agent.runtime",
            "edge_agent.rpc",
            "edge_agent.service",
            "edge_agent.fleet",
        ),
    ),
    ("measurement", ("edge_agent.observability",)),
    ("models", ("edge_agent.repository",)),
    ("learning", ("edge_agent.learn",)),
    (
        "subsystems",
        ("edge_agent.api", "edge_agent.sync", "edge_agent.compress", "edge_agent.controlplane"),
    ),
    ("daemon", ("edge_agent.agent",)),
    ("command-line helpers", ("edge_agent.fleet.commands",)),
    (
        "command lines",
        (
            "edge_agent.client",
            "edge_agent.fleet.cli",
            "edge_agent.learn.cli",
            "edge_agent.compress.cli",
        ),
    ),
    ("the edge-agent command", ("edge_agent.cli",)),
    ("entry point", ("edge_agent.__main__",)),
)


def entry_of(module: str) -> tuple[int, str] | None:
    """(layer index, entry) of a dotted module name, by its longest entry; None if none names it.
    The root entry "edge_agent" names only the package itself, not everything below it."""
    best: tuple[int, str] | None = None
    for index, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            named = module == entry or (entry != "edge_agent" and module.startswith(entry + "."))
            if named and (best is None or len(entry) > len(best[1])):
                best = (index, entry)
    return best


def violation(importer: str, imported: str) -> str | None:
    """Why `importer` may not import `imported`, or None when it may."""
    source, target = entry_of(importer), entry_of(imported)
    if source is None or target is None:
        return f"{importer} imports {imported}: not in the layer table"
    if source[1] == target[1] or target[0] < source[0]:
        return None
    if target[0] == source[0]:
        return f"{importer} imports its sibling {imported} ({LAYERS[source[0]][0]})"
    return f"{importer} ({LAYERS[source[0]][0]}) imports {imported} ({LAYERS[target[0]][0]})"


def table() -> str:
    """The layers as a Markdown table, top first (as docs/architecture.md shows them)."""
    rows = ["| layer | packages and modules (each imports only from the rows below it) |"]
    rows.append("| --- | --- |")
    for name, entries in reversed(LAYERS):
        shown = ", ".join(f"`{e.removeprefix('edge_agent.')}`" for e in entries)
        rows.append(f"| {name} | {shown} |")
    return "\n".join(rows)

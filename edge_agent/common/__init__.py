"""Pure building blocks shared by several subsystems (below all of them: they import nothing of
edge_agent but errors)."""

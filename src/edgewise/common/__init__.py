"""Small building blocks every layer may use: reconnect pacing, atomic file writes, and the
check that an optional part's extra is installed (`extras`).

Imports nothing of Edgewise but `edgewise.errors`.
"""

"""Deterministic signal generators (the reference factory line and custom profiles), used by the
simulator source, the planner and the benchmarks.

A leaf: imports nothing of Edgewise. The whole-system harness is `edgewise.testbed`.
"""

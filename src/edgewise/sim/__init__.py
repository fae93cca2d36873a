"""Simulation: deterministic signal generators such as the reference factory line."""

"""Pipelines: the spec (YAML → pydantic, `spec`), the engine that runs one pipeline on one event
loop (`engine`, with `commit` for group commits and `checkpoint`), and the components: sources,
operators and sinks (`registry` finds them, plugins included).

May import outbox, sync, specfile, sim (signal generators), common and errors. The engine writes
to an outbox it is lent; it never knows whether an agent or ``edgewise run`` runs it.
"""

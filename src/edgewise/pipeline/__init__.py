"""Pipelines: the spec (YAML → pydantic), the engine, and its operators, sources and sinks."""

"""The control plane: device and operator APIs, ingest, fleet registry, config, PKI glue."""

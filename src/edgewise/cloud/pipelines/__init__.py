"""Cloud pipelines: pipelines the control plane runs itself over what nodes sent.

`spec` (what a cloud pipeline may hold), `merge` (event-time merge with a watermark per node,
pure), `source` (the `stream` source over the store), `runner` (one pipeline: the engine,
its outbox and the shipper into the store, exactly once), `worker` (the thread that runs them
all, off the app's event loop), `api` (the operator routes, ``/v1/cloud/pipelines``).
See docs/cloud-pipelines.md.
"""

"""Releases on the control plane: content-addressed file storage (`blobs`), publishing and
signing (`service`: the online TUF keys, publish, re-signing before expiry) and the HTTP
routes (`api`: the operator's ``/v1/releases`` and the nodes' ``/v1/device/tuf/``).
docs/updates.md describes the format, the key ceremony and what is served.
"""

"""The whole system on one machine: a control plane and agents as real processes behind link
proxies that count bytes and cut links. Used by ``edgewise demo``, the system tests and the sync
benchmarks; nothing below the CLI imports it.

    system     `System`, `ControlPlane`, `AgentProcess`, pipelines and checks shared by its users
    linkproxy  `LinkProxy`: a TCP proxy that counts, shapes and cuts a link
    demo       the demo run behind ``edgewise demo``
"""

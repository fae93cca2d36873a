"""The edge node: outbox, and (later) agent lifecycle, uplink session, twin, updater."""

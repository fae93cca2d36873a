"""The edge node: the agent's lifecycle (`agent`), its uplink session to the control plane
(`uplink`, with `transfer`, `uplink_store`, `frames`, `flow`, `ledger`, `wire`), identity and
certificate renewal (`identity`), desired and reported state (`twin`), the status file
(`status`) and what a decommissioned node does (`decommission`: wipe, marker, refusal to start).

May import pipeline, outbox, sync, security, common and errors; never cloud, plan or the CLI.
Room is left here for the node's updater (releases, A/B slots) and health reporting.
"""

"""The fleet simulator: thousands of virtual nodes per process speaking the real device
protocol, for scale tests (issue 11) and as the harness for rollouts (issue 12).

`node.VirtualNode` is one node (enrolment with a CSR, one mutual-TLS WebSocket session,
heartbeats, reports, telemetry with real sequence numbers, acks, desired-state fetches when
poked, the agent's full-jitter reconnects); `release.NodeUpdater` is what a node does with an
assigned release (the agent's slot state machine driven by time; outcomes and durations from
`release.Behaviour`); `shared` is what the nodes of a process share; `run.run_fleet` runs many
of them over one or more processes and `run.verify` checks every sequence number sent against
what the control plane stored; `stats` holds the samples and percentiles. ``edgewise sim
fleet`` is the command (`edgewise.cli.fleet`); ``benchmarks/fleet_scale.py`` and
``benchmarks/rollout_sim.py`` drive it against real control planes
(`scenario`, `rollout_scenario`).
"""

from edgewise.testbed.fleet.node import VirtualNode
from edgewise.testbed.fleet.release import Behaviour, NodeUpdater
from edgewise.testbed.fleet.run import FleetConfig, Verdict, parse_link, run_fleet, verify
from edgewise.testbed.fleet.shared import NodeSettings
from edgewise.testbed.fleet.stats import NodeResult, Recorder, percentile

__all__ = ["Behaviour", "FleetConfig", "NodeResult", "NodeSettings", "NodeUpdater", "Recorder",
           "Verdict", "VirtualNode", "parse_link", "percentile", "run_fleet", "verify"]

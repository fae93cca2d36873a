"""The fleet simulator: thousands of virtual nodes per process speaking the real device
protocol, for scale tests (issue 11) and as the harness for rollouts.

`node.VirtualNode` is one node (enrolment with a CSR, one mutual-TLS WebSocket session,
heartbeats, reports, telemetry with real sequence numbers, acks, desired-state fetches when
poked, the agent's full-jitter reconnects); `run.run_fleet` runs many of them over one or more
processes and `run.verify` checks every sequence number sent against what the control plane
stored; `stats` holds the samples and percentiles. ``edgewise sim fleet`` is the command
(`edgewise.cli.fleet`); ``benchmarks/fleet_scale.py`` drives it against real control planes.
"""

from edgewise.testbed.fleet.node import NodeSettings, VirtualNode
from edgewise.testbed.fleet.run import FleetConfig, Verdict, parse_link, run_fleet, verify
from edgewise.testbed.fleet.stats import NodeResult, Recorder, percentile

__all__ = ["FleetConfig", "NodeResult", "NodeSettings", "Recorder", "Verdict", "VirtualNode",
           "parse_link", "percentile", "run_fleet", "verify"]

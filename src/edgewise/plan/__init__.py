"""The planner: from a workload description to a placed, sized, quantified architecture, with
every figure backed by running the real engine (`simulate`) and a document to sign (`document`).

May import pipeline, outbox, sync, specfile, sim, common and errors; it drives the engine only
through the engine's public hooks.
"""

from edgewise.common.extras import require_extra

require_extra("plan", "the planner (edgewise.plan)")

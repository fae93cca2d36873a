"""The planner: from a workload description to a placed, sized, quantified architecture."""

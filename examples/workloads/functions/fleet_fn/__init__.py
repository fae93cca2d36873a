"""User functions of the vehicle-fleet example workload (examples/workloads/vehicle-fleet.yaml)."""

"""Staged rollouts of releases (docs/operations.md, *Rollouts*).

    spec      the request as stored, the fleet gates and their judgement (pure)
    plan      waves and the disruption budget (pure)
    observe   what a node reports, as a rollout needs it (pure)
    machine   the state machine: one decision per tick (pure)
    driver    the loop that applies the decisions (the store, desired versions, pokes)
    models    the API's request and answer models
    api       the operator routes and the driver's place in the app

The tables are in `edgewise.cloud.store.rollouts` (migration 0007).
"""

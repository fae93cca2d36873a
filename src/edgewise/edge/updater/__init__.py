"""The node's updater: releases applied into A/B slots, health-gated, rolled back on failure.

* `machine`: the slot state machine, pure (what ``DATA/releases/state.json`` holds and every
  transition: stage, switch, commit, roll back, refuse, and what a start does);
* `store`: the slots on disk and the state file (atomic, fsynced writes);
* `stage`: a release into the inactive slot (reuse by hash, download, verify, offline wheel
  install, pipeline validation) and the switch;
* `check`: pipeline validation, also as a child process for releases with plugins;
* `gate`: the health gate's judgement and its probe;
* `source`: `DirectorySource`, a release source over a folder (the tests' fake, USB sticks);
* `updater`: `Updater`, what the agent runs beside its engine supervisor;
* `launcher`: `edgewise agent launch`, which runs the agent from the active slot and rolls back
  an agent that exits or hangs during its trial.

docs/updates.md, "Applying a release on the node", is the description for people.
"""

"""The one command line, ``edgewise ...``: one module per command group.

    main      the root group, ``run``, ``validate``, ``sim``, ``dead-letters``, ``components``
    agent     ``agent run|status``            cloud     ``cloud serve|token``
    operator  ``node``, ``config``, ``data``  plan      ``plan``
    demo      ``demo``                        common    exit codes, error output, formatting
    output    ``--format table|wide|json|yaml``, ``--json``, ``--utc`` of every data command
    logs      log lines (UTC timestamps, ``--log-format json``)
    startup   the ``edgewise`` process's start-up settings (BLAS threads, the collector)
    (and tokens, release, rollout, fleet, fleet_ops, cloud_pipeline: their groups)

Flags and the environment are read here and nowhere else. Nothing below this package imports it.
"""

from edgewise.cli.main import main

__all__ = ["main"]

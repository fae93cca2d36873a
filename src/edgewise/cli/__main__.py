"""``python -m edgewise.cli``: the same as the ``edgewise`` command."""

from edgewise.cli.main import main

main()

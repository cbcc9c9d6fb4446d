"""``python -m tilead``: the ``tilead`` command."""

from tilead.cli.main import main

main()

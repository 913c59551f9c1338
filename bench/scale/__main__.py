"""``python -m bench.scale``: see :mod:`bench.scale`."""

from . import main

main()

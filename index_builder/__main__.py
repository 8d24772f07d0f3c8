"""``python -m index_builder build | ground-truth`` (see :mod:`index_builder.cli`)."""

from index_builder.cli import main

main()

"""``python -m epicfeat`` is the ``epicfeat`` command."""
from epicfeat.cli import main

main()

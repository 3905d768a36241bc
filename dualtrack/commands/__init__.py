"""The CLI's command groups, one module each (assembled in :mod:`dualtrack.cli`)."""

"""The cloud track: a Pulumi program (entry point ``infra/__main__.py``) plus the
settings, profile table and output contract the rest of the repository reads."""

"""Code that runs on the hosts: knowledge base, LLM routing, gateway, sync.

This package never imports ``infra`` or ``dualtrack``: hosts install it alone.
"""

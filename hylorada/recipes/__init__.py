"""Workflows: each module is a readable top-to-bottom recipe that a command or a user's script
calls (docs/ARCHITECTURE.md: the layers and the flow)."""

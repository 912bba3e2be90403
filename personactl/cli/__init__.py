"""Typer commands: one module per command, no logic, no heavy imports at module level."""

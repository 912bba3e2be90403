"""Pure math and statistics: no I/O, no model, no files.

May import nothing of personactl except `personactl.errors` (enforced by import-linter, see pyproject.toml).
"""

"""The chat engine shared by `personactl chat` and `personactl serve`: the session, the live readout, the
OpenAI-compatible HTTP server. No terminal code.

May import: steps and every layer below, and the top-level errors and settings; never cli
(layers: pyproject.toml, [tool.importlinter]).
"""

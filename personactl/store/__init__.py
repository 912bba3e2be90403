"""Artifacts on disk: the workspace (the only code that knows artifact paths) and its lock, the
tagged-safetensors reader/writer, vector files and their checks, traits, text inputs, and `interop/`
(other tools' vector files).

May import: core, and the top-level errors and settings (layers: pyproject.toml, [tool.importlinter]).
"""

"""Artifacts on disk: the workspace (`Workspace` names every artifact's path) and its lock, atomic
writes, the one tagged-safetensors reader/writer (`tagged_file`) and the files written through it
(vectors with their checks and report, readouts, pair differences), the responses table's
vocabulary, traits, the user's text inputs, and `interop/` (other tools' vector files).

May import: core, and the top-level errors and settings (layers: pyproject.toml, [tool.importlinter]).
"""

"""The loaded model: loading (the only place that loads model weights), chat format and exact spans,
activations, steering hooks, capability cost.

May import: store, core, and the top-level errors and settings (layers: pyproject.toml, [tool.importlinter]).
"""

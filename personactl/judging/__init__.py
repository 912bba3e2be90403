"""Judges that score replies: `remote` (any OpenAI-compatible endpoint, the only `import openai`) and
`local` (the loaded model itself).

May import: backends, model, store, core, and the top-level errors and settings (layers: pyproject.toml).
"""

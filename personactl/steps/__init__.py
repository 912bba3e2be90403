"""The workspace steps behind the commands (generate, score, extract, steer, eval, proxy, monitor,
readout, ithou, compare, run, import, ...): each reads and writes artifacts in a workspace.

May import: judging, backends, model, store, core, and the top-level errors and settings; never chat or cli
(layers: pyproject.toml, [tool.importlinter]).
"""

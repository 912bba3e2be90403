"""personactl: persona vectors for open LLMs.

The public API is imported lazily so that `import personactl` (and `personactl --help`) stays fast:

    from personactl import load_model, extract_vectors, PersonaVector, Steerer, load_trait
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load_model": "personactl.model.loading",
    "LoadedModel": "personactl.model.loading",
    "extract_vectors": "personactl.model.activations",
    "PairExample": "personactl.model.chat_format",
    "PersonaVector": "personactl.store.vectors",
    "load_trait": "personactl.store.traits",
    "Trait": "personactl.store.traits",
    "Settings": "personactl.settings",
    "Steerer": "personactl.model.steering",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'personactl' has no attribute {name!r}")

"""Vector files of other tools, to and from personactl vector files.

Every format is mapped onto personactl's one layer convention (row `l` = residual stream after
decoder block `l`, 1-based; row 0 = embeddings):

| format | file | index in the file | personactl row |
|---|---|---|---|
| `gguf` | llama.cpp control vector (repeng writes the same) | `direction.k`, 0-based block k | k + 1 |
| `steering-vectors` | `torch.save`d `SteeringVector` or `{layer_activations, layer_type}` | block k | k + 1 |
| `pt` | `torch.save` of an `[L+1, H]` tensor (persona_vectors) | row | row |
| `json` | `{"vector", "layer", "model", ...}` JSON + tensor file | `layer` = row, `layer_idx` = block | as named |

Modules: `foreign` (what a file holds before it meets a model), one module per file family,
`detect` (which family a file is), `exporting` (the export step; the import step is
`personactl.steps.import_vector`).
"""

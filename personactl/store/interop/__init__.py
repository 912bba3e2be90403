"""Vector files of other tools, to and from personactl vector files.

Every format is mapped onto personactl's one layer convention (row `l` = residual stream after
decoder block `l`, 1-based; row 0 = embeddings):

| format | file | index in the file | personactl row |
|---|---|---|---|
| `gguf` | llama.cpp control vector (repeng writes the same) | `direction.k`, 0-based block k | k + 1 |
| `steering-vectors` | `torch.save`d `SteeringVector` or `{layer_activations, layer_type}` | block k | k + 1 |
| `pt` | `torch.save` of an `[L+1, H]` tensor (persona_vectors) | row | row |
| `json` | `{"vector", "layer", "model", ...}` JSON + tensor file | `layer` = row, `layer_idx` = block | as named |
| `assistant-axis` | `torch.save` of `{"axis": [L, H], ...}` | block k (a hook on `layers[k]`) | k + 1 |
| `assistant-axis-caps` | capping config `{"vectors", "experiments"}`, τ per capped vector | `layer` = block k | k + 1 |
| `plan` (export only) | `personactl.plan/1` safetensors: `--steer` terms | row | row |

Modules: `foreign` (what a file holds before it meets a model), one module per file family,
`detect` (which family a file is), `assistant_axis`, `plan_file` (`export --steer`), `exporting` (the
export step; the import step is `personactl.steps.import_vector`).
"""

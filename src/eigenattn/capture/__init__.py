"""Stage 2, attention-score capture: the attention arithmetic, the capture backend, per-layer
masks, the equivalence probe and the extraction into Zarr (docs/models.md)."""

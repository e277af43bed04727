"""Stages 3-4, spectra: streaming moments of score rows, row and full-matrix eigendecompositions
and their stores, the Dask scheduler, subspace overlap and the scaling study (docs/method.md
§3-5, §10)."""

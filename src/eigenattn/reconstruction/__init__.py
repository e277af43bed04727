"""Stage 5, reconstruction from partial computation: estimators, metrics, held-out evaluation,
the partial attention backend and the plug-in into pretrained models (docs/method.md §6-7)."""

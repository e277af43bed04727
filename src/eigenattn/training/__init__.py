"""Stage 6, training with approximate attention: MLM data, the encoder and its attention
variants, the training loop, the run intervals and the summary table (docs/method.md §8)."""

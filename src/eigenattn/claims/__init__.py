"""Stage 7, the claims table: shared verdict rules, C1-C2 (spectra), C3-C4 (reconstruction and
training) and the table that joins them (docs/method.md §9)."""

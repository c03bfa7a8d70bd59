"""The `pass_at_k` metric folder; `evaluate.load` reads `pass_at_k.py` from it (see `ilr.metrics`)."""

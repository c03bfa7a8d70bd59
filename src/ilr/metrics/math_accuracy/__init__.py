"""The `math_accuracy` metric folder; `evaluate.load` reads `math_accuracy.py` from it (see `ilr.metrics`)."""

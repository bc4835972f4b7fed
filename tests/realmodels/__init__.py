"""The real-model slice (marked realmodel)."""

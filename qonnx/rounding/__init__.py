"""Rounding cores (pure numpy): AdaRound's layer problem, its moments and blocks, and the local search on the exact layer loss."""

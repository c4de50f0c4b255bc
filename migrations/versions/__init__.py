"""Migration scripts, numbered 0001, 0002, ..."""

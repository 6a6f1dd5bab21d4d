"""`imgarena export` (not yet implemented: defines no register())."""

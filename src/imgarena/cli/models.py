"""`imgarena models` (not yet implemented: defines no register())."""

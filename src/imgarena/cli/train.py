"""`imgarena train` (not yet implemented: defines no register())."""

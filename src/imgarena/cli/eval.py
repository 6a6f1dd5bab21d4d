"""`imgarena eval` (not yet implemented: defines no register())."""

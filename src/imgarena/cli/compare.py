"""`imgarena compare` (not yet implemented: defines no register())."""

"""swin family: being written (see issue #3)."""

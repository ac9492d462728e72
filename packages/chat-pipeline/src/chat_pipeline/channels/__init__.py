"""Channels: the seam (`base`) and one module per channel kind."""

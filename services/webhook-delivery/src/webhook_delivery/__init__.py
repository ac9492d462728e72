"""Signed, retried delivery of tenant-configured webhook events."""

"""Delivers replies through Meta's WhatsApp Cloud API and tracks delivery status."""

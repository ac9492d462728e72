"""Delivers replies through a Baileys-based WhatsApp QR service (WAHA / Evolution API)."""

"""HTTP ingress: widget API, WhatsApp webhooks, tenant admin API, health and metrics."""

"""Integrations that only some users need; the core never imports them."""

"""Stripe webhooks: signature verification, the durable event queue, event processing."""

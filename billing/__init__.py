"""Billing: Stripe customers, plans, subscriptions, credit packages and the credits they buy."""

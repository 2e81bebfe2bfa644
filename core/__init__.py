"""Pieces every component shares: money units, configuration, the base Struct."""

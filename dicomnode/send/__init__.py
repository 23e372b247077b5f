"""Sending back: the durable outbox (one item per object and destination) and the SCU."""

"""Sinks: the outbox (towards the cloud), MQTT publish, HTTP webhook, file, log."""

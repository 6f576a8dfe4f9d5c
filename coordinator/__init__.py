"""Coordinator (server): rounds over MQTT, update validation, FedAvg, releases."""

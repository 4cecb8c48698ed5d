"""Wiring: model/SAE loading, the feature store, Ray workers, the CLI, the HTTP API."""

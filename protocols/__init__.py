"""Pluggable protocol logic (SMPC, federated learning, dealing), sans-IO where it fits."""

"""The online-learning service: HTTP API, learning worker, version store, forgetting gate, metrics."""

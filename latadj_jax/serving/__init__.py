"""Serving: the Predictor (and the HTTP server)."""

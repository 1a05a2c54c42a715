"""Offline tuning: the executable cache, sweeps over k, speed and latency targets, reports, plots."""

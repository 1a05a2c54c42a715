"""The math: score vectors, survivor selection, keep-count schedules, metrics. Imports nothing of ours."""

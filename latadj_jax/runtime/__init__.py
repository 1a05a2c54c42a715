"""Run plumbing: workdirs, configs, the CLI error line, timing, multi-host start-up and launch."""

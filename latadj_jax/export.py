"""``python -m latadj_jax.export``: the public command; the code is ``latadj_jax.serving.export``."""

from latadj_jax.serving.export import main

if __name__ == "__main__":
  from latadj_jax.runtime import cli
  cli.run(main)

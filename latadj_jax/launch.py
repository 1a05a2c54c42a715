"""``python -m latadj_jax.launch``: the public command; the code is ``latadj_jax.runtime.launch``."""

import sys

from latadj_jax.runtime.launch import main

if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))

"""runtime/executables.py: executables kept whole on disk load and run in a later process."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latadj_jax.runtime.executables import ExecutableCache


def test_an_executable_from_the_persistent_cache_is_saved_whole(tmp_path):
  # jaxlib serializes an executable that it loaded from JAX's persistent compilation cache
  # without its code: loaded again, it fails with "Function ... not found". The cache files
  # are a copy of the executable anyway, so ExecutableCache compiles past that cache.
  assert jax.config.jax_compilation_cache_dir  # conftest: one persistent cache per test run
  f = jax.jit(lambda x, m: jnp.where(m[:, None] > 0, jnp.tanh(x @ x.T), 0.0).sum(1))
  x, m = jnp.ones((8, 8)), jnp.arange(8)
  want = f(x, m)        # compiled, and written to the persistent cache
  jax.clear_caches()    # so the next compile of the program loads it from there
  ExecutableCache(disk_dir=tmp_path).get(("k",), lambda: f.lower(x, m))
  cache = ExecutableCache(disk_dir=tmp_path)
  again = cache.get(("k",), lambda: pytest.fail("lowered again: not loaded from disk"))
  assert cache.stats.disk_hits == 1
  np.testing.assert_array_equal(again(x, m), want)

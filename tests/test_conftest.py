"""The suite's compile set-up (see conftest.py): flags are probed, not assumed, and in effect."""

import os

import conftest
import jax


def test_unknown_xla_flag_is_refused_by_the_probe():
  # (an XLA that does not know a flag aborts: the probe must see that, not crash the suite)
  assert not conftest._accepted(["--xla_no_such_flag_jxent=1"])


def test_fast_compile_set_up_in_effect():
  flags = os.environ["XLA_FLAGS"].split()
  assert "--xla_force_host_platform_device_count=8" in flags
  if os.environ.get("JXENT_TEST_XLA_OPT") != "1":
    assert set(os.environ["JXENT_TEST_FAST_COMPILE"].split()) <= set(flags)
  assert jax.config.jax_compilation_cache_dir == conftest._CACHE
  assert os.path.isdir(conftest._CACHE)

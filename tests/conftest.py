"""Shared pytest configuration. Area-specific fixtures live in tests/_fixtures_<area>.py."""

import os

# Keep test runs deterministic and light on this 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

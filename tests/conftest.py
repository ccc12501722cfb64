"""Shared pytest configuration. Area-specific fixtures live in tests/_fixtures_<area>.py."""

import os

# Keep test runs deterministic and light on this 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# usearch (imported by some tests and benchmarks) must not be loaded before onnxruntime: the
# other order segfaults (libstdc++ symbol clash in usearch 2.26's extension). Load it first.
try:
    import onnxruntime  # noqa: F401
except ImportError:
    pass

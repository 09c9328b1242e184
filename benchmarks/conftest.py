"""pytest-benchmark suite: ``pytest benchmarks --benchmark-only``.

The cases (ops, implementations, sizes, byte counts) are those of ``fastvae bench``
(``fastvae/cli/bench.py``); this suite times them with pytest-benchmark's statistics and
comparison tools instead of the roofline table.
"""

import os

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

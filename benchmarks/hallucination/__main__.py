"""``python -m benchmarks.hallucination``: see :mod:`benchmarks.hallucination.run`."""

from benchmarks.hallucination.run import main

raise SystemExit(main())

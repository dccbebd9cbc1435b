"""The generation benchmark (``proxykern.apps.bench_generate``), runnable from a checkout.

    python benchmarks/bench_generate.py --out DIR [--configs paper,small] [--batches 1,16] ...
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from proxykern.apps.bench_generate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Thin wrapper: ``scripts/bench.py ARGS`` is ``lustrefuse bench ARGS`` (see --help)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lustrefuse.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

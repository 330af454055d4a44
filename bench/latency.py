#!/usr/bin/env python
"""Latency and throughput of .onnx, .engine or slim2deploy .pt files, interleaved against a --baseline.

The tool users run on each target machine (``--help`` for everything); it is ``slim2deploy.cli.latency``,
which imports no torch for ``.onnx`` and ``.engine`` files. slim2deploy must be importable: installed
(``pip install slim2deploy``; on a GPU box with only numpy and a runtime, ``pip install --no-deps``), or
this checkout on ``PYTHONPATH``.
"""

import sys

from slim2deploy.cli.latency import main

if __name__ == "__main__":
    sys.exit(main())

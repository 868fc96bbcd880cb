#!/usr/bin/env python
"""Stochastic depth's training-time saving, measured side by side: same as ``sd-zoo bench``.

    python scripts/bench.py                      # sd_resnet110, batch 128, p_L 0.5 linear
    python scripts/bench.py --model sd_resnet20 --batch-size 32 --steps 10 --compile
"""
import sys

from sd_zoo.cli import main

if __name__ == '__main__':
    sys.exit(main(['bench', *sys.argv[1:]]))

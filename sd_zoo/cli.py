"""The ``sd-zoo`` command: a thin shell over sd-zoo's Python API."""
import argparse
import sys
from typing import List, Optional


def build_parser() -> argparse.ArgumentParser:
    from . import bench

    parser = argparse.ArgumentParser(prog='sd-zoo', description='Stochastic-depth ResNets for timm.')
    sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    p = sub.add_parser('bench', help='measure the training-time saving of stochastic depth',
                       description=bench.__doc__.split('\n\n')[0])
    bench.add_bench_arguments(p)
    p.set_defaults(func=bench.run_from_args)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ValueError as e:
        print(f'sd-zoo {args.command}: error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())

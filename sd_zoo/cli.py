"""The ``sd-zoo`` command: a thin shell over sd-zoo's Python API.

    sd-zoo bench ...      stochastic depth's training-time saving, measured (sd_zoo.bench)
    sd-zoo train ...      train with timm's library, timm train.py flag names (sd_zoo.training)
    sd-zoo validate ...   top-1/top-5/loss on a dataset split (sd_zoo.evaluation)
    sd-zoo publish ...    a run or checkpoint to the Hugging Face Hub (sd_zoo.publishing)
    sd-zoo recipes        the training recipes that ship with sd-zoo (sd_zoo.recipes)
    sd-zoo cache          the in-memory loader's decoded-images cache, and pruning it (sd_zoo.cache)
"""
import argparse
import sys
from typing import List, Optional

COMMANDS = {
    'bench': ('sd_zoo.bench', 'measure the training-time saving of stochastic depth'),
    'train': ('sd_zoo.training', 'train a model with timm\'s library (train.py flag names, --config YAML)'),
    'validate': ('sd_zoo.evaluation', 'evaluate a model, checkpoint, hf-hub: or local-dir: on a dataset split'),
    'publish': ('sd_zoo.publishing', 'stage a training run as a Hub repository and push it in one commit'),
    'recipes': ('sd_zoo.recipes', 'list the training recipes that ship with sd-zoo (--path NAME: its file)'),
    'cache': ('sd_zoo.cache', 'list the decoded-images cache (--prune: remove stale entries, --clear: all)'),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='sd-zoo', description='Stochastic-depth ResNets for timm.',
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


# errors that a user's input or environment causes (a bad flag value, a missing or unreadable path): one line
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
               PermissionError)


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line. A DataLoader worker re-raises an error with the worker's
    traceback in its message: its last line is the original message."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f'{error.strerror}: {error.filename!r}'
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith('Caught ') and 'DataLoader worker' in lines[0]:
        last = lines[-1]
        return last.split(': ', 1)[1] if last.startswith(type(error).__name__ + ':') else last
    return ' '.join(lines) or type(error).__name__


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command. Errors a user can fix are one line ``sd-zoo CMD: error: ...`` and exit status 2;
    anything else is a bug and keeps its traceback (as do all errors with SD_ZOO_TRACEBACK=1)."""
    import importlib
    import os
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        _top_parser().parse_args(argv)  # prints usage and exits for a missing or unknown command
        return 2
    command, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[command][0])
    try:
        module.main(rest)
    except USER_ERRORS as e:
        if os.environ.get('SD_ZOO_TRACEBACK'):
            raise
        print(f'sd-zoo {command}: error: {one_line(e)}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f'sd-zoo {command}: interrupted', file=sys.stderr)
        return 130
    return 0


if __name__ == '__main__':
    sys.exit(main())

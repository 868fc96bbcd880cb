"""``python tests/slow_save.py train ...``: sd-zoo's CLI with a pause at each point of an epoch's save, announced
on stderr, so that a test can kill the run at exactly that point (tests/test_faults.py). The points:
checkpoint-written (complete in tmp.pth.tar, not in place), checkpoint-saved (in place, log rows not yet
written), logs-written (the epoch's rows written)."""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's sd_zoo

from sd_zoo.checkpoints import AtomicCheckpointSaver  # noqa: E402
from sd_zoo.cli import main  # noqa: E402
from sd_zoo.runs import RunFolder  # noqa: E402

PAUSE_S = 3.0


def pause(where: str, epoch: int) -> None:
    print(f'SLOW_SAVE {where} epoch {epoch}', file=sys.stderr, flush=True)
    time.sleep(PAUSE_S)


def patch() -> None:
    written, append_rows = AtomicCheckpointSaver.written, RunFolder.append_rows

    def slow_written(self, path, epoch):
        written(self, path, epoch)
        pause('checkpoint-written', epoch)

    def slow_append_rows(self, record):
        pause('checkpoint-saved', record['epoch'])
        append_rows(self, record)
        pause('logs-written', record['epoch'])

    AtomicCheckpointSaver.written = slow_written
    RunFolder.append_rows = slow_append_rows


if __name__ == '__main__':
    patch()
    sys.exit(main(sys.argv[1:]))

"""The process's entry point: ``python -m bot`` and the ``voicebot`` command."""

import os
import sys

# Before anything loads numpy: OpenBLAS's worker threads spin for a while after every call, and
# the only BLAS calls here are small (faster-whisper's mel filterbank): idle spinning cost ~4 %
# of the server's CPU at four calls.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from .cli import main  # noqa: E402  (numpy loads from here on)


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()

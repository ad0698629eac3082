"""An AudioSocket voicebot for Asterisk: listen, understand, think and speak, locally."""

import os

# Before anything loads numpy: OpenBLAS's worker threads spin for a while after every call, and
# the only BLAS calls here are small (faster-whisper's mel filterbank): idle spinning cost ~4 %
# of the server's CPU at four calls.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"

"""A runtime that crashes fails the one test that ran it, naming the signal, and the suite goes on.

Every runtime (llama.cpp, vLLM) runs in a subprocess through runtimes.run; this checks that
contract itself with a process that really dies of SIGSEGV (no runtime needed)."""
from __future__ import annotations

import sys

import pytest

from .runtimes import run


def test_a_crashing_runtime_fails_with_the_signal_named():
    crash = "import os, signal; print('loading'); os.kill(os.getpid(), signal.SIGSEGV)"
    with pytest.raises(AssertionError, match=r"llama\.cpp on m\.gguf crashed with SIGSEGV:\nloading"):
        run([sys.executable, "-c", crash], what="llama.cpp on m.gguf")


def test_a_failing_runtime_reports_its_exit_code():
    with pytest.raises(AssertionError, match=r"failed \(exit 3\)"):
        run([sys.executable, "-c", "raise SystemExit(3)"], what="x")

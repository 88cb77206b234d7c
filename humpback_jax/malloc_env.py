"""glibc malloc settings that let XLA:CPU reuse a program's temporaries instead of re-faulting them.

XLA:CPU allocates a program's temporaries as one block per execution (585 MB for the bench20m
train step). glibc serves blocks over 32 MB with `mmap` and hands them back with `munmap`, so every
step faults in and zeroes every page afresh, a measurable share of the step's CPU time
(bench/RESULTS.md). With one arena, no `mmap` and no trimming, a freed block stays
in the heap and the next step reuses it (the role tcmalloc plays for MaxText on TPU VMs). glibc
reads these variables only when a process starts, so entry points restart themselves once with them.
"""
from __future__ import annotations

import os
import platform
import sys

SETTINGS = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
OPT_OUT = "HUMPBACK_MALLOC_DEFAULTS"


def missing(environ) -> dict[str, str]:
  """The SETTINGS that `environ` does not set yet (a variable the user set wins)."""
  return {k: v for k, v in SETTINGS.items() if k not in environ}


def restart_with_settings(environ=os.environ, execv=os.execv) -> None:
  """Re-executes this command with SETTINGS added, unless they are set, opted out or not glibc.

  Call it first thing in a command-line entry point (never in library code or tests: it replaces
  the process). `HUMPBACK_MALLOC_DEFAULTS=0` opts out.
  """
  todo = missing(environ)  # empty after the restart: the libc check below reads the interpreter file
  if not todo or environ.get(OPT_OUT, "1") == "0" or platform.libc_ver()[0] != "glibc":
    return
  environ.update(todo)
  execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])

"""The command line's error boundary: one line per mistake a user can make, and exit codes.

Every error a user can cause (config, data, mesh/sharding, files and URLs, model loading,
resume, an ``output_dir`` that belongs to another run) is printed as one line naming the
file/line/key/URL and what was expected, and the process exits with :data:`EXIT_USER_ERROR`.
A failure during the run (a disk or bucket error while saving, a non-finite loss) is one line
too, naming what failed and what to do, with :data:`EXIT_FAILURE`. ``--debug`` on the command
line or ``TORCHXLA_RLHF_DEBUG=1`` shows the traceback instead.

Exit codes (documented in the README):

- 0: the run finished.
- :data:`EXIT_FAILURE` (1): the run failed after it started (:class:`RunFailure`: an I/O error
  during training or a save, a non-finite loss or gradient norm). Checkpoints published before
  the failure are intact; ``resume_from=auto`` continues from the last complete one.
- :data:`EXIT_USER_ERROR` (2): bad config, data, paths, mesh... (argparse's code for usage
  errors). An ``OSError`` before training starts (a path the user gave) counts as one.
- :data:`EXIT_PREEMPTED` (75, ``EX_TEMPFAIL``): the run was preempted (SIGTERM, or a first
  Ctrl-C), saved its training state and stopped; the same command with
  ``resume_from=auto`` continues it. The pipeline stops on it, and the launcher restarts on it.
- :data:`EXIT_INTERRUPTED` (130, the shell's code for SIGINT): a second Ctrl-C stopped the run
  at once; nothing half-written is published.

Nothing here imports torch or torch_xla: the boundary wraps the whole entry point.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import sys
from typing import Any, Callable, Iterator, TypeVar

EXIT_FAILURE = 1
EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130
RESUME_HINT = "rerun with resume_from=auto to continue from the last complete checkpoint"
DEBUG_ENV = "TORCHXLA_RLHF_DEBUG"

T = TypeVar("T")


class UserError(Exception):
    """A mistake in what the user asked for; its message is the whole explanation."""


class RemoteError(UserError):
    """A remote path (``gs://``, an fsspec URL, the HF hub) could not be reached or read."""


class ResumeError(UserError, ValueError):
    """``resume_from`` names no usable training state."""


class OutputDirError(UserError):
    """``output_dir`` holds another run's results."""


class RunFailure(Exception):
    """The run failed after it started, through no fault in what the user asked for (a disk
    filled up, a bucket stopped answering, the loss became non-finite); its message is the
    whole explanation, naming what failed and what to do."""


class NonFiniteError(RunFailure):
    """A training metric (loss, gradient norm) became NaN or infinite; nothing after the last
    finite step was published."""


@contextlib.contextmanager
def failure_during(operation: str, path: str, *extra: type[BaseException]) -> Iterator[None]:
    """Turn an ``OSError`` (or one of ``extra``, e.g. safetensors' write error) raised inside
    the block into a :class:`RunFailure` naming ``operation``, ``path`` and how to resume."""
    try:
        yield
    except (OSError, *extra) as e:
        raise RunFailure(f"{operation} {path} failed: {one_line(e)}; {RESUME_HINT}") from e


class Preempted(Exception):
    """Raised by :func:`~torchxla_rlhf.trainers.base.run` after a preempted run has saved
    its training state: the caller must not treat the stage as finished."""

    def __init__(self, step: int, checkpoint: str):
        super().__init__(f"preempted at step {step}; saved {checkpoint} "
                         f"(rerun the same command with resume_from=auto to continue)")
        self.step = step
        self.checkpoint = checkpoint


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exception classes that mean "the user's input is wrong" (not a bug).

    The project's own (``ConfigError``, ``DataError``, ``MeshError``, ``ShardingError``...)
    derive from :class:`UserError`; ``OSError`` covers missing files, unwritable directories and
    unreadable URLs (its message names the path) met at start-up. The trainer turns an
    ``OSError`` raised once training has started into a :class:`RunFailure`.
    """
    return (UserError, OSError)


def debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run_guarded(fn: Callable[[], T], prog: str, debug: bool) -> T:
    """Call ``fn``; a user error prints ``prog: error: <one line>`` and exits 2, a failure
    during the run ``prog: failed: <one line>`` and exits 1, a preemption prints what to do
    and exits 75, a second Ctrl-C exits 130. With ``debug`` the traceback is shown instead."""
    try:
        return fn()
    except Preempted as e:
        # The state is saved: a second Ctrl-C whose handler runs only now (Python runs signal
        # handlers between bytecodes, so one pressed during a long device call lands late)
        # must not turn this into Python's death by SIGINT.
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # pending handler calls are skipped too
        except ValueError:  # not the main thread
            pass
        try:
            print(f"{prog}: {e}", file=sys.stderr)
        except KeyboardInterrupt:
            pass
        raise SystemExit(EXIT_PREEMPTED) from None
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted; nothing half-written was published; {RESUME_HINT}",
              file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except RunFailure as e:
        _report(prog, "failed", e, debug)
        raise SystemExit(EXIT_FAILURE) from None
    except user_error_types() as e:
        _report(prog, "error", e, debug)
        raise SystemExit(EXIT_USER_ERROR) from None


def _report(prog: str, what: str, e: BaseException, debug: bool) -> None:
    if debug:
        raise e
    print(f"{prog}: {what}: {one_line(e)}", file=sys.stderr)
    print(f"{prog}: (--debug or {DEBUG_ENV}=1 shows the traceback)", file=sys.stderr)


def one_line(e: BaseException) -> str:
    """The error's message; an ``OSError`` without one gets its class, errno text and path."""
    text = str(e).strip()
    if isinstance(e, OSError) and (not text or e.filename):
        what = e.strerror or type(e).__name__
        text = f"{what}: {e.filename}" if e.filename else (text or what)
    if isinstance(e, KeyError):  # KeyError's str() is the repr of the key
        text = text.strip("'\"")
    return text or type(e).__name__


def call_with_timeout(fn: Callable[[], T], timeout_s: float, what: str, hint: str = "") -> T:
    """Run ``fn`` (a remote listing or open) but give up after ``timeout_s`` seconds.

    gcsfs and the hub client retry DNS and credential failures for a minute or more before
    raising a 150-line traceback; a start-up check that takes a second when the network works
    should fail as fast when it does not. The worker thread is abandoned on timeout (it is a
    daemon thread; the process is about to exit with the message).
    """
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    future = pool.submit(fn)
    try:
        return future.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        raise RemoteError(
            f"{what}: no answer within {timeout_s:g} s (remote_timeout_s); "
            f"{hint or 'check the network and credentials'}"
        ) from None
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of the remote client, named once
        raise RemoteError(f"{what}: {type(e).__name__}: {one_line(e)}") from e
    finally:
        pool.shutdown(wait=False)


__all__: list[Any] = [
    "EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_PREEMPTED", "EXIT_USER_ERROR", "NonFiniteError",
    "OutputDirError", "Preempted", "RemoteError", "RunFailure", "UserError",
    "call_with_timeout", "debug_requested", "failure_during", "one_line", "run_guarded",
    "user_error_types",
]

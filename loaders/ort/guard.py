"""Calls into ONNX Runtime and tokenizers with a container's content: stoppable, time-limited, and failing
as rbe's own errors.

A stored graph is a program: a ``Loop`` may never end, a ``ConstantOfShape`` may ask for terabytes, and
a tokenizer.json is another program's configuration.  ``call`` runs one call into the runtime in a worker
thread while the calling thread waits in short steps, so that:

* a stop signal (``rbe``'s handlers raise ``Interrupted`` in the main thread) or the time limit
  (``Deadline``) sets ``RunOptions.terminate``: ONNX Runtime stops between kernels, an endless ``Loop``
  too; the worker ends and the signal's exception (or, for the time limit, an ``InputError``) goes on.
  A session's build, a single long kernel and a tokenizer call cannot be stopped: past ``STOP_GRACE``
  seconds their worker (a daemon thread) is left to finish on its own, and a process that exits does
  not wait for it;
* an exception raised by ONNX Runtime or tokenizers becomes an ``InputError`` naming the container,
  with the first line of the runtime's message (``ONNX Runtime could not allocate ...`` for a failed
  allocation); any other exception is rbe's own and goes on as it is.

``session_options`` gives sessions on a container's graph an empty folder for external data: a model
handed over as bytes has its external data looked up there instead of in the working directory (a
second wall behind ``rbeformat.onnx_safety``, which refuses such references before any session).

Imports only the standard library and rbeformat; onnxruntime when a function needs it.
"""

from __future__ import annotations

import os
import queue
import re
import tempfile
import threading
import time
from contextlib import contextmanager

from rbeformat import InputError, RbeError

POLL_SECONDS = 0.1  # how often the waiting thread looks at the clock (signals interrupt the wait at once)
STOP_GRACE = 5.0  # seconds a stopped worker gets to end before it is left behind
WORKER_NAME = "rbe-runtime-call"
EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"
QUIET = 4  # ONNX Runtime's FATAL log level: its errors come back as exceptions, reported in one line


class Deadline:
    """A time limit shared by several calls (a session's build, then its runs); ``seconds`` None or 0: none."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds or None
        self._at = None if self.seconds is None else time.monotonic() + self.seconds

    @classmethod
    def of(cls, timeout: float | Deadline | None) -> Deadline:
        return timeout if isinstance(timeout, Deadline) else cls(timeout)

    def left(self) -> float | None:
        return None if self._at is None else self._at - time.monotonic()


class _Worker:
    """A daemon thread running calls one at a time; idle between them, back in ``_idle`` after each.

    Threads live on, waiting for the next call, rather than one per call: a thread ending while the
    process exits (right after a stop signal) aborted it in onnxruntime's teardown (std::terminate,
    exit 134 instead of 143); an idle worker waits outside onnxruntime and is never woken.
    """

    def __init__(self):
        self.jobs = queue.SimpleQueue()
        threading.Thread(target=self._serve, name=WORKER_NAME, daemon=True).start()

    def _serve(self) -> None:
        while True:
            fn, box, done = self.jobs.get()
            try:
                box["value"] = fn()
            except BaseException as exc:  # handed to the waiting thread
                box["error"] = exc
            finally:
                del fn
                done.set()
                with _idle_lock:
                    _idle.append(self)


_idle: list[_Worker] = []
_idle_lock = threading.Lock()


def _submit(fn) -> tuple[dict, threading.Event]:
    with _idle_lock:
        worker = _idle.pop() if _idle else None
    worker = worker or _Worker()
    box, done = {}, threading.Event()
    worker.jobs.put((fn, box, done))
    return box, done


def call(fn, *, path: str, doing: str, deadline: Deadline | None = None, run_options=None, source: str = "onnxruntime"):
    """``fn()`` in a worker thread; its result, or its exception as described in the module doc.

    ``doing``: what the call does, for messages ("running the stored graph");
    ``run_options``: the ``onnxruntime.RunOptions`` the call runs with, terminated on a stop;
    ``source``: "onnxruntime" or "tokenizers", whose exceptions become ``InputError``.
    """
    box, done = _submit(fn)
    try:
        while not done.is_set():
            left = deadline.left() if deadline is not None else None
            if left is not None and left <= 0:
                raise InputError(
                    f"{path}: the time limit of {deadline.seconds:g} s ran out while {doing}, which "
                    "was stopped (rbe run --timeout sets the limit, 0 for none)"
                )
            done.wait(POLL_SECONDS if left is None else min(POLL_SECONDS, left))
    except BaseException:  # a stop signal, Ctrl-C or the time limit
        _stop(done, run_options)
        raise
    if "error" in box:
        exc = box.pop("error")
        described = describe(exc, path, doing, source)
        if described is None:
            raise exc
        raise described from None
    return box["value"]


def _stop(done: threading.Event, run_options) -> None:
    if run_options is not None:
        run_options.terminate = True  # ONNX Runtime checks it between kernels
    done.wait(STOP_GRACE)


def describe(exc: BaseException, path: str, doing: str, source: str = "onnxruntime") -> InputError | None:
    """The InputError for an exception the runtime raised on a container's content; None for any other
    (rbe's own errors and bugs, which go on unchanged)."""
    if isinstance(exc, RbeError) or not isinstance(exc, Exception) and type(exc).__name__ != "PanicException":
        return None
    if source == "tokenizers":
        if (
            type(exc) is Exception
            or type(exc).__name__ == "PanicException"
            or isinstance(exc, (OverflowError, ValueError))
        ):
            return InputError(f"{path}: the embedded tokenizer failed while {doing}: {first_line(exc)}")
        return None
    from_runtime = type(exc).__module__.startswith("onnxruntime") or isinstance(exc, (MemoryError, SystemError))
    if not from_runtime:
        return None
    message = first_line(exc)
    if isinstance(exc, MemoryError) or "allocate" in message.lower():
        detail = (
            message[message.lower().find("failed to allocate") :]
            if "failed to allocate" in message.lower()
            else message
        )
        return InputError(f"{path}: ONNX Runtime could not allocate memory while {doing} ({detail})")
    building = "building a session on "
    verb = f"refused {doing[len(building) :]}" if doing.startswith(building) else f"failed while {doing}"
    return InputError(f"{path}: ONNX Runtime {verb}: {message}")


_RUNTIME_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
_SOURCE_LOCATION = re.compile(r"\S*onnxruntime_src\S*:\d+ (?:[^()\s]+ )*[^()\s]*\([^()]*\)(?: const)? ?")


def first_line(exc: BaseException, limit: int = 240) -> str:
    """The first line of an exception's message, without ONNX Runtime's status prefix and C++ source
    locations, printable characters only."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    line = _SOURCE_LOCATION.sub("", _RUNTIME_PREFIX.sub("", line))
    line = "".join(c for c in line if c.isprintable())
    return line[:limit] + ("..." if len(line) > limit else "")


# -- sessions ----------------------------------------------------------------------------


@contextmanager
def session_options(options=None, *, quiet: bool = False):
    """``options`` (or new ``SessionOptions``) pointing external data at a fresh empty folder, removed on
    exit; ``quiet`` also keeps ONNX Runtime's own log lines off stderr (its errors come back as exceptions)."""
    import onnxruntime

    options = options if options is not None else onnxruntime.SessionOptions()
    if quiet:
        options.log_severity_level = QUIET
    folder = tempfile.mkdtemp(prefix="rbe-no-external-data-")
    options.add_session_config_entry(EXTERNAL_FOLDER_KEY, folder)
    try:
        yield options
    finally:
        try:
            os.rmdir(folder)
        except OSError:  # left to the system's temporary-file cleanup
            pass


def run_options(quiet: bool = True):
    """``onnxruntime.RunOptions`` for one run; ``quiet``: no error log lines (the exception says it)."""
    import onnxruntime

    options = onnxruntime.RunOptions()
    if quiet:
        options.log_severity_level = QUIET
    return options


def run(
    session,
    outputs,
    feed: dict,
    *,
    path: str,
    deadline: Deadline | None = None,
    doing: str = "running the stored graph",
):
    """``session.run(outputs, feed)``, stoppable and time-limited (``call``)."""
    options = run_options()
    return call(
        lambda: session.run(outputs, feed, options), path=path, doing=doing, deadline=deadline, run_options=options
    )

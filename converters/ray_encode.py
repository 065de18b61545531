"""Encoding on a Ray cluster: ``rbe convert --ray [ADDRESS]`` (the extra ``rbe[ray]``).

Each tensor's encoding, lossless or by its codec chain with its calibration,
is one Ray task; it returns the tensor encoded with its sections kept
(``rbeformat.encoding``), and the one writer places them in manifest order
(``Writer.add_later``).  The file is therefore byte for byte the one a single
process writes: chunk records, aliases and digests are computed the same way,
and the workers' linear algebra runs with the driver's number of BLAS threads.

A task reads its tensor from the input itself when its node sees the file the
driver sees (same size and modification time: a shared file system), else the
driver hands the bytes over through Ray's object store, for that tensor and
every one after it.  A worker holds one tensor's work at a time; at most as
many tasks as the cluster has CPUs (``window``) are under way, so the driver
holds at most that many encoded tensors waiting for their turn.

Without an address a local Ray starts with ``workers`` CPUs (default: the
machine's); with one (``HOST:PORT``, or ``auto`` for the cluster this machine
belongs to) the conversion joins an existing cluster.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable

import numpy as np

from rbeformat.encoding import EncodedTensor, encode_lossless, encode_transformed, keep_sections, transformed_key
from rbeformat.errors import RbeError, UsageError
from rbeformat.spec import DTYPES
from rbeformat.values import to_float32

SENT_KEPT = 3  # values put in the object store that the driver remembers (``_put_once``)
NOT_SHARED = "not-shared"  # a task's answer when its node does not see the input as the driver does
BLAS_THREADS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def import_ray():
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray: pip install 'rbe[ray]'") from None
    return ray


def blas_threads() -> int:
    """The threads this process's BLAS uses (numpy's linear algebra, as in GPTQ)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return int(os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or os.cpu_count())
    counts = [pool["num_threads"] for pool in threadpool_info() if pool.get("user_api") == "blas"]
    return counts[0] if counts else 1


def check_answers(address: str, timeout: float = 5.0) -> None:
    """Refuses at once a HOST:PORT where nothing accepts a connection (Ray itself retries for minutes,
    printing its own log lines); other forms (``auto``) are left to Ray."""
    target = address.removeprefix("ray://")
    host, colon, port = target.rpartition(":")
    if not colon or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise UsageError(f"--ray {address}: nothing answers at {target} ({exc.strerror or exc})") from None


class RayEncoders:
    """Hands tensors' encodings to Ray tasks; ``lossless`` and ``transformed`` return what
    ``Writer.add_later`` waits on."""

    def __init__(self, address: str | None = None, workers: int | None = None, share_input: bool = True):
        if address:
            check_answers(address)
        self.ray = import_ray()
        env = {name: str(blas_threads()) for name in BLAS_THREADS}
        options = {
            "runtime_env": {"env_vars": env},
            "include_dashboard": False,
            "log_to_driver": False,
            "logging_level": logging.ERROR,  # rbe's own lines only, as without --ray
        }
        try:
            if address:
                self.ray.init(address=address, **options)
            else:
                self.ray.init(address="local", num_cpus=workers or os.cpu_count(), **options)
        except (ConnectionError, RuntimeError, ValueError) as exc:  # no cluster there, or Ray would not start
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise UsageError(f"--ray {address or ''}: Ray did not start or could not be joined ({first})") from None
        self.window = max(1, int(self.ray.cluster_resources().get("CPU", 1)))
        self.share_input = share_input
        self._task = self.ray.remote(num_cpus=1, max_retries=2)(encode_task)
        self._sent: dict[int, tuple] = {}  # id(value) -> (its ObjectRef, the value), oldest first

    def close(self) -> None:
        self._sent.clear()
        self.ray.shutdown()

    def __enter__(self) -> RayEncoders:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def lossless(self, source, t, codec) -> Callable[[], EncodedTensor]:
        job = {"kind": "lossless", "name": t.name, "dtype": t.dtype, "shape": list(t.shape), "codec": codec}
        return self._submit(source, job, None, None, None)

    def transformed(
        self, source, name: str, chain, *, values=None, refs=None, calibration=None, dedup: bool = True
    ) -> Callable[[], EncodedTensor]:
        """``values``: what to encode when it is not the stored tensor (pruned); the stored one is then
        the reference the error statistics compare with.  ``dedup`` as ``Writer.add_transformed``'s."""
        t = source.tensor(name)
        job = {"kind": "transformed", "name": name, "dtype": t.dtype, "shape": list(t.shape), "chain": chain}
        job["dedup"] = dedup
        return self._submit(source, job, values, refs, calibration)

    def _submit(self, source, job: dict, values, refs, calibration) -> Callable[[], EncodedTensor]:
        extra = [self._put_once(x) if x is not None else None for x in (values, refs, calibration)]
        located = source.locate(job["name"]) if self.share_input else None
        if located is not None:
            path, offset, length = located
            job = {**job, "file": [path, offset, length, *file_identity(path)]}
            future = self._task.remote(job, None, *extra)
        else:
            future = self._task.remote(job, self._stored_bytes(source, job["name"]), *extra)

        def resolve() -> EncodedTensor:
            encoded = self._get(future, job["name"])
            if isinstance(encoded, str) and encoded == NOT_SHARED:  # hand it over, now and after
                self.share_input = False
                retry = self._task.remote(job, self._stored_bytes(source, job["name"]), *extra)
                encoded = self._get(retry, job["name"])
            return encoded

        return resolve

    def _get(self, future, name: str):
        """A task's result; its own error (rbe's) as raised, one line for Ray's."""
        try:
            return self.ray.get(future)
        except self.ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, RbeError):
                raise exc.cause from None
            raise RbeError(f"tensor {name!r}: its Ray task failed ({type(exc.cause).__name__}: {exc.cause})") from None
        except self.ray.exceptions.RayError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RbeError(f"tensor {name!r}: Ray could not run its task ({first})") from None

    def _stored_bytes(self, source, name: str):
        return self.ray.put(np.ascontiguousarray(source.read(name)).reshape(-1).view(np.uint8))

    def candidate(self, source, name: str, base, upgrades, calibration, counts: str) -> Callable:
        """Mixed precision's scores of one weight (``mixed.candidate``); ``resolve()`` returns its
        Candidate."""
        t = source.tensor(name)
        job = {"kind": "candidate", "name": name, "dtype": t.dtype, "shape": list(t.shape)}
        job.update(chain=base, upgrades=upgrades, counts=counts)
        return self._submit(source, job, None, None, calibration)

    def _put_once(self, value):
        """Puts a value (a group's shared state, one stage's calibration) in the object store once
        for the tasks that read it one after another; only the last few are remembered, so that the
        driver keeps no earlier stage's Hessians alive."""
        known = self._sent.get(id(value))
        if known is not None and known[1] is value:
            return known[0]
        if len(self._sent) >= SENT_KEPT:
            del self._sent[next(iter(self._sent))]
        ref = self.ray.put(value)
        self._sent[id(value)] = (ref, value)
        return ref


def file_identity(path: str) -> tuple[int, int]:
    """What a worker compares to know it sees the driver's file: its size and modification time."""
    info = os.stat(path)
    return info.st_size, info.st_mtime_ns


def encode_task(job: dict, data, values, refs, calibration) -> EncodedTensor | str:
    """One tensor's encoding, in a worker: its stored bytes read from the input file or handed over."""
    if data is None:
        data = _read_located(*job["file"])
        if data is None:
            return NOT_SHARED
    dtype, shape = job["dtype"], job["shape"]
    if job["kind"] == "lossless":
        return encode_lossless(dtype, shape, data, job["codec"])
    stored = np.frombuffer(data, np.dtype(DTYPES[dtype].numpy_storage)).reshape(shape)
    if job["kind"] == "candidate":
        from .compress.mixed import candidate

        x = to_float32(stored, dtype)
        return candidate(job["name"], x, job["chain"], job["upgrades"], calibration, job["counts"])
    array = stored if values is None else values
    return encode_transformed(
        job["name"],
        dtype,
        array,
        job["chain"],
        keep_sections(),
        refs=refs,
        calibration=calibration,
        reference=stored if values is not None else None,
        key=transformed_key(array, dtype, job["chain"]) if job["dedup"] else None,
    )


def _read_located(path: str, offset: int, length: int, size: int, mtime_ns: int) -> bytes | None:
    """The bytes at ``offset`` of ``path`` when this node sees the file the driver saw, else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if (info.st_size, info.st_mtime_ns) != (size, mtime_ns):
            return None
        data = os.pread(fd, length, offset)
        return data if len(data) == length else None
    finally:
        os.close(fd)

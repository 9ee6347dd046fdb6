"""Known-harmless messages of the libraries u2s runs, silenced where they start, each with the reason.

:func:`quiet_driver` runs in the process that runs a command (``u2s run``, a Ray job's entrypoint);
:func:`quiet_worker` in every Ray worker process of a cluster u2s starts or attaches to
(``worker_process_setup_hook``, see :func:`u2s.pipeline.init_ray`). ``--verbose`` keeps every message.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

#: The import path Ray's ``worker_process_setup_hook`` takes.
WORKER_SETUP_HOOK = "u2s.quiet.quiet_worker"


class _DropMessages(logging.Filter):
    """Drops records whose message contains one of ``fragments``."""

    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def quiet_libraries() -> None:
    """The messages both drivers and workers would print."""
    # CPU installs have no torchvision on purpose (its PyPI builds are CUDA builds); transformers then
    # loads the PIL image processors u2s's CPU path uses anyway, and says so once per processor class.
    logging.getLogger("transformers.utils.import_utils").addFilter(
        _DropMessages("requires torchvision (not installed); falling back to")
    )
    # Weight loading and shard writing bars: one per model load, per actor; u2s reports its own progress.
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    except ImportError:
        pass


#: Lines that Ray's C++ core worker writes straight to the driver's stderr and that do not apply to u2s.
#: Ray Data hands every actor of a pool its operator's state as object refs it holds for the pool's
#: lifetime, and u2s's pools restart actors (``max_restarts``, :mod:`u2s.healing`); Ray 2.60 then logs,
#: once per actor, that a restart would fail if those refs were lost (ray-project/ray#53727).
NATIVE_NOTICES = ("has constructor arguments in the object store and max_restarts > 0",)

# The filter runs in a process of its own, not a thread: when the driver dies (a crash, SIGKILL) the
# filter still drains what the driver's last moments wrote, so no final error line is lost.
_FILTER = """import sys
fragments = [f.encode() for f in sys.argv[1:]]
for line in sys.stdin.buffer:
    if not any(f in line for f in fragments):
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()
"""

_quiet = False
_native_filter: subprocess.Popen | None = None


def drop_native_notices() -> bool:
    """Route what native code writes to file descriptor 2 through a filter that drops
    :data:`NATIVE_NOTICES`; Python's own stderr keeps writing to the terminal directly.

    Only after :func:`quiet_driver` (not with ``--verbose``) and only where stderr is a real file
    descriptor (not a test runner's capture); once per process. Returns whether the filter runs.
    """
    global _native_filter
    if not _quiet or _native_filter is not None:
        return _native_filter is not None
    try:
        if sys.stderr.fileno() != 2:
            return False
    except (AttributeError, OSError, ValueError):
        return False
    sys.stderr.flush()
    terminal = os.dup(2)
    read, write = os.pipe()
    _native_filter = subprocess.Popen(
        [sys.executable, "-c", _FILTER, *NATIVE_NOTICES], stdin=read, stdout=terminal, close_fds=True
    )
    os.close(read)
    old = sys.stderr
    sys.stderr = os.fdopen(terminal, "w", buffering=1, encoding=old.encoding, errors=old.errors)
    for handler in _stream_handlers():  # logging's handlers keep the stream they were made with
        if handler.stream is old:
            handler.setStream(sys.stderr)
    os.dup2(write, 2)  # native code (Ray's core worker) keeps writing to fd 2: now the filter
    os.close(write)
    return True


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    return [
        handler
        for each in loggers
        for handler in getattr(each, "handlers", [])
        if isinstance(handler, logging.StreamHandler)
    ]


def quiet_driver() -> None:
    """:func:`quiet_libraries`, and Ray Data's driver-side notices that do not apply to u2s's plans;
    :func:`drop_native_notices` then filters Ray's native ones when the driver starts Ray."""
    global _quiet
    _quiet = True
    quiet_libraries()
    # Ray Data warns when no CPU is free as a Dataset starts; u2s's actor pools hold every CPU by design
    # (their actors start before the first batch), and the tasks that need one get it as actors free it.
    logging.getLogger("ray.data.dataset").addFilter(
        _DropMessages("The Dataset job will hang unless more CPUs")
    )
    # The same, said again while it runs: a task operator (fetch, decode, read) waits for CPUs that the
    # actor pools hold; it runs as they free them. A pool that cannot start (a GPU the cluster lacks) is
    # still reported: its operator is an ActorPoolMapOperator.
    logging.getLogger("ray.data._internal.execution.resource_manager").addFilter(
        _DropMessages("Cluster resources are not enough to run any task from TaskPoolMapOperator")
    )


def quiet_ray_data() -> None:
    """Ray Data's own progress output off, where a u2s command reports its own: progress bars, INFO lines
    (execution plans, operator stats, "Starting execution") and the issue detectors' multi-line advice
    (per-operator memory, hanging tasks) every 30 s. ``--verbose`` (DEBUG logging of ``u2s``) keeps them."""
    if logging.getLogger("u2s").isEnabledFor(logging.DEBUG):
        return
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data._internal.progress").addFilter(_DropMessages("Progress bars disabled"))
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.issue_detection").setLevel(logging.ERROR)


def quiet_worker() -> None:
    """Ray's ``worker_process_setup_hook``: :func:`quiet_libraries` in each worker process."""
    quiet_libraries()

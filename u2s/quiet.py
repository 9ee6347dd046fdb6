"""Known-harmless messages of the libraries u2s runs, silenced where they start, each with the reason.

:func:`quiet_driver` runs in the process that runs a command (``u2s run``, a Ray job's entrypoint);
:func:`quiet_worker` in every Ray worker process of a cluster u2s starts or attaches to
(``worker_process_setup_hook``, see :func:`u2s.pipeline.init_ray`). ``--verbose`` keeps every message.
"""

from __future__ import annotations

import logging

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


def quiet_driver() -> None:
    """:func:`quiet_libraries`, and Ray Data's driver-side notices that do not apply to u2s's plans."""
    quiet_libraries()
    # Ray Data warns when no CPU is free as a Dataset starts; u2s's actor pools hold every CPU by design
    # (their actors start before the first batch), and the tasks that need one get it as actors free it.
    logging.getLogger("ray.data.dataset").addFilter(
        _DropMessages("The Dataset job will hang unless more CPUs")
    )


def quiet_worker() -> None:
    """Ray's ``worker_process_setup_hook``: :func:`quiet_libraries` in each worker process."""
    quiet_libraries()

"""Keep private text out of logs that u2s does not write itself."""

from __future__ import annotations

import logging

#: Libraries whose warnings quote model inputs, e.g. diffusers' CLIP truncation warning prints the
#: cut-off part of the edit instruction. In u2s those inputs are private captions and instructions.
INPUT_ECHOING_LOGGERS = ("transformers", "diffusers")


def silence_input_echo() -> None:
    """Raise the model libraries' log level to ERROR in this process (call where a model loads)."""
    for name in INPUT_ECHOING_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)

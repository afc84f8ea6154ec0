"""Progress bars for the long steps (tokenisation, training, evaluation, export), with rate and
ETA; all of them, transformers' included, are off in quiet mode: `peftkit --quiet ...` or
PEFTKIT_QUIET=1 in the environment (logs and CI)."""

from __future__ import annotations

import os


def quiet() -> bool:
    return os.environ.get("PEFTKIT_QUIET", "") not in ("", "0")


def set_quiet() -> None:
    """Quiet mode for this process and the processes it starts."""
    os.environ["PEFTKIT_QUIET"] = "1"
    from transformers.utils import logging

    logging.disable_progress_bar()


def bar(iterable=None, total: int | None = None, desc: str = "", unit: str = "it", disable: bool = False, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable or quiet(), dynamic_ncols=True,
                **kwargs)  # fmt: skip

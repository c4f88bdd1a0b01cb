"""Rank-zero Python logging: messages from processes other than rank 0 are dropped."""

from __future__ import annotations

import logging

from lightning.pytorch.utilities import rank_zero_only


class _RankZeroFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return rank_zero_only.rank == 0  # type: ignore[attr-defined]  # Lightning sets .rank on the function


def get_logger(name: str) -> logging.Logger:
    """A logger that only rank 0 writes to, so a DDP run logs each message once."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, _RankZeroFilter) for f in logger.filters):
        logger.addFilter(_RankZeroFilter())
    return logger

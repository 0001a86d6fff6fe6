"""What every ``imag`` sub-command does first, the core's and plugins' alike."""

from __future__ import annotations

import argparse

from archive.config import Config, load_config
from archive.logs import setup_logging


def load(args: argparse.Namespace) -> Config:
    """The configuration named by ``--config`` (file, ``IMAG_*``, defaults), and
    logging set up as it says."""
    config = load_config(args.config)
    setup_logging(config["log.level"], config["log.format"], config.node)
    return config

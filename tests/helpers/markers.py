"""Marker lines that subprocess workers print for the tests that drive them."""

import os
import sys


def announce(marker: str) -> None:
    """Write ``marker`` on a line of its own in one ``write`` (atomic on a pipe): the ranks of a job
    share the test's pipe, and ``print`` writes the text and the newline apart, so two ranks' markers,
    or a marker and a half-written warning, could otherwise share one line and the test miss it."""
    os.write(sys.stdout.fileno(), f"\n{marker}\n".encode())

"""Progress output that suits where it goes: a live tqdm bar on a terminal; when the output is a file or a
CI log, no carriage-return frames at all (callers print one line per epoch or per evaluation instead)."""
from __future__ import annotations

import sys
from typing import Optional

from tqdm.auto import tqdm


def is_terminal(stream=None) -> bool:
    """Whether ``stream`` (default: stderr, where tqdm draws) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams (pytest's capture, say)
        return False


def bar(total: Optional[float] = None, enabled: bool = True, **kwargs) -> tqdm:
    """A tqdm bar, drawn only when ``enabled`` and stderr is a terminal (a disabled bar still counts, silently)."""
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(total=total, disable=not (enabled and is_terminal()), **kwargs)


def write(line: str) -> None:
    """Print a line without breaking a live bar."""
    tqdm.write(line)

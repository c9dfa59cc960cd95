"""When to show a progress bar."""
from __future__ import annotations


def hide_bar(progress: bool | None) -> bool | None:
    """tqdm's `disable` for a `progress` setting: True shows the bar, False hides it, and
    None (the default everywhere) shows it only where stderr is a terminal, so logs and
    CI output stay free of bars."""
    return None if progress is None else not progress

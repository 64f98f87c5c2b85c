"""Ctrl-C and SIGTERM during training: the first asks for a checkpoint and a clean stop, the second aborts."""
from __future__ import annotations

import signal
import threading
from typing import Any, Dict, Optional

from ._progress import Reporter

__all__ = ["StopSignals"]


class StopSignals:
    """First SIGINT/SIGTERM: ask the loop to stop after the current step. Second: KeyboardInterrupt now."""

    def __init__(self, reporter: Reporter, event: Optional[threading.Event]) -> None:
        self.reporter = reporter
        self.event = event
        self.requested = False
        self.by_signal = False
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and self.by_signal:
            raise KeyboardInterrupt
        self.requested = self.by_signal = True
        self.reporter.warning("stopping after this step to write a checkpoint (Ctrl-C again to abort now)")

    @property
    def stop_now(self) -> bool:
        if not self.requested and self.event is not None and self.event.is_set():
            self.requested = True
        return self.requested

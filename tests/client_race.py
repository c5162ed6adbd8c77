"""gradio_client 2.5.0 (the one gradio 6.17.3 pins) loses a call whose completion reaches its client's open event
stream before the submitting thread has registered it: the reader's `pending_event_ids.remove` raises KeyError and
the stream dies, cancelling every call of that client (a CI run failed so). gradio_client 2.7 discards instead and
keeps what the reader got first; these two containers do the same for the tests' clients."""

from __future__ import annotations

import threading
from collections import deque


class Registered(set):
    """The ids of a client's pending calls, where a completion may come before its id does."""

    def remove(self, event_id):
        self.discard(event_id)


class KeepReceived(dict):
    """Messages per call: registering a call with an empty queue keeps what its reader already received."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()

    def __setitem__(self, event_id, messages):
        with self._lock:
            if event_id in self and isinstance(messages, deque) and not messages:
                return
            super().__setitem__(event_id, messages)


def patch_client(mp) -> None:
    """Give every Client made through `mp` (a pytest MonkeyPatch) the two containers above."""
    from gradio_client import Client

    init = Client.__init__

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.pending_event_ids = Registered(self.pending_event_ids)
        self.pending_messages_per_event = KeepReceived(self.pending_messages_per_event)

    mp.setattr(Client, "__init__", __init__)

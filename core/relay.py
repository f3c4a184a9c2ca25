"""A chat that is answering on another process, seen from this one (several processes on one Redis).

A page that reconnects lands on whichever process the proxy picks, and its chat may still be
answering on the process it left; a second tab may open the chat on another process. Sending every
token of every stream through Redis would make each process decode all of them, so a stream goes
straight to the client that asked, and a process asks the others, only when a client joins a chat
that answers elsewhere, to send *that* answer to *that* client as well: the process running it adds
a sink that emits through Socket.IO's message queue, where the client's session id reaches it on
whichever process holds its connection. A stop travels the same way.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from core.chat import ChatJob
from core.jobs import Sink

if TYPE_CHECKING:
    from core.chat import ChatService
    from core.cluster import Cluster

log = logging.getLogger(__name__)

#: How long a join waits for the process answering the chat. Past it (a process that died
#: mid-answer and is not yet taken for dead), the client gets the answer as stored.
JOIN_WAIT_S = 2.0


class ChatRelay:
    """Joins and stops for chats answering on other processes, over the cluster's relay channel."""

    def __init__(self, cluster: Cluster, chat: ChatService) -> None:
        self.cluster = cluster
        self.chat = chat
        #: Builds a sink that reaches a client connected to another process from the `address` its
        #: own sink gave; set by the web layer (core knows no Socket.IO).
        self.sink_for: Callable[[dict[str, Any]], Sink] | None = None
        self._waiting: dict[str, threading.Event] = {}
        cluster.on_relay = self.handle

    def join_elsewhere(self, chat_id: str, sink: Sink) -> bool:
        """Ask the process answering `chat_id` to send that answer to `sink` too. True when it took
        the client (it sends `joined` with the text so far, then the live events); False when no
        other live process is answering the chat, the sink cannot be reached from another process
        (an HTTP response), or nobody took it within JOIN_WAIT_S."""
        address = getattr(sink, "address", None)
        if address is None or self.sink_for is None or not self.chat.store.streaming_elsewhere(chat_id):
            return False
        request_id = uuid.uuid4().hex
        taken = threading.Event()
        self._waiting[request_id] = taken
        try:
            self.cluster.relay({"type": "join", "chat": chat_id, "sink": address, "id": request_id})
            joined = taken.wait(JOIN_WAIT_S)
        finally:
            self._waiting.pop(request_id, None)
        log.info("event=chat_join_relayed chat=%s taken=%s", chat_id, joined)
        return joined

    def stop_elsewhere(self, chat_id: str) -> bool:
        """Ask whichever process is answering `chat_id` to stop; True when one was (as far as the
        shared database knows)."""
        if not self.chat.store.streaming_elsewhere(chat_id):
            return False
        self.cluster.relay({"type": "stop", "chat": chat_id})
        log.info("event=chat_stop_relayed chat=%s", chat_id)
        return True

    def handle(self, message: dict[str, Any]) -> None:
        """One message from the relay channel (every process gets every message, its own included)."""
        kind = message.get("type")
        if kind == "taken":
            waiting = self._waiting.get(str(message.get("id")))
            if waiting is not None:
                waiting.set()
        elif kind == "join" and message.get("from") != self.cluster.instance:
            self._join_here(str(message.get("chat")), message.get("sink"), message.get("id"))
        elif kind == "stop" and message.get("from") != self.cluster.instance:
            if self.chat.runner.stop(ChatJob.kind, str(message.get("chat"))):
                log.info("event=chat_stop_taken chat=%s by=%s", message.get("chat"), message.get("from"))

    def _join_here(self, chat_id: str, address: Any, request_id: Any) -> None:
        """When this process is answering `chat_id`: add the remote client to its audience."""
        job = self.chat.runner.get(ChatJob.kind, chat_id)
        if job is None or job.ending or self.sink_for is None or not isinstance(address, dict):
            return
        self.chat.join(chat_id, self.sink_for(address))
        self.cluster.relay({"type": "taken", "id": request_id})
        log.info("event=chat_join_taken chat=%s", chat_id)

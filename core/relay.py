"""A chat that is answering on another process, seen from this one (several processes on one Redis).

A page that reconnects lands on whichever process the proxy picks, and its chat may still be
answering on the process it left; a second tab may open the chat on another process. Sending every
token of every stream through Redis would make each process decode all of them, so a stream goes
straight to the client that asked, and a process asks the others, only when a client joins a chat
that answers elsewhere, to send *that* answer to *that* client as well: the process running it adds
a sink that emits through Socket.IO's message queue, where the client's session id reaches it on
whichever process holds its connection. A stop travels the same way, and so does the client's
disconnect, so an answer nobody receives any more is still stopped after the grace period.

Messages on the relay channel: join {chat, sink, id} -> taken {id}; stop {chat}; left {sink}.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from core.chat import ChatJob
from core.errors import ClusterUnavailable, NotFound
from core.jobs import Sink

if TYPE_CHECKING:
    from core.chat import ChatService
    from core.cluster import Cluster

log = logging.getLogger(__name__)

#: How long a join waits for the process answering the chat. Past it (a process that died
#: mid-answer and is not yet taken for dead), the client gets the answer as stored.
JOIN_WAIT_S = 2.0


def remote_client_id(address: dict[str, Any]) -> str:
    """The client id (core.jobs.Audience) of a sink that reaches a client of another process."""
    return "relay:" + json.dumps(address, sort_keys=True)


class ChatRelay:
    """Joins, stops and departures for chats answering on other processes, over the relay channel."""

    def __init__(self, cluster: Cluster, chat: ChatService) -> None:
        self.cluster = cluster
        self.chat = chat
        #: Builds a sink that reaches a client connected to another process from the `address` its
        #: own sink gave; set by the web layer (core knows no Socket.IO).
        self.sink_for: Callable[[dict[str, Any]], Sink] | None = None
        self._waiting: dict[str, threading.Event] = {}
        #: This process's clients whose join another process took: {client id: address}.
        self._relayed: dict[str, dict[str, Any]] = {}
        cluster.on_relay = self.handle

    # -- this process's clients -------------------------------------------------------------------
    def join_elsewhere(self, chat_id: str, sink: Sink) -> bool:
        """Ask the process answering `chat_id` to send that answer to `sink` too. True when it took
        the client (it sends `joined` with the text so far, then the live events); False when no
        other live process is answering the chat, the sink cannot be reached from another process
        (an HTTP response), Redis is away, or nobody took it within JOIN_WAIT_S."""
        address = getattr(sink, "address", None)
        if address is None or self.sink_for is None or not self.chat.store.streaming_elsewhere(chat_id):
            return False
        request_id = uuid.uuid4().hex
        taken = threading.Event()
        self._waiting[request_id] = taken
        # Remembered whatever comes of it: a late "taken" still added the client over there, and
        # its disconnect must reach that process (a "left" for a client nobody holds is harmless).
        self._relayed[getattr(sink, "client", None) or request_id] = address
        try:
            self.cluster.publish_relay({"type": "join", "chat": chat_id, "sink": address, "id": request_id})
            joined = taken.wait(JOIN_WAIT_S)
        except ClusterUnavailable:
            joined = False  # the stored answer is still worth showing
        finally:
            self._waiting.pop(request_id, None)
        log.info("event=chat_join_relayed chat=%s taken=%s", chat_id, joined)
        return joined

    def stop_elsewhere(self, chat_id: str) -> bool:
        """Ask whichever process is answering `chat_id` to stop; True when one was (as far as the
        shared database knows). Raises ClusterUnavailable when Redis is away."""
        if not self.chat.store.streaming_elsewhere(chat_id):
            return False
        self.cluster.publish_relay({"type": "stop", "chat": chat_id})
        log.info("event=chat_stop_relayed chat=%s", chat_id)
        return True

    def client_left(self, client: str) -> None:
        """A client of this process disconnected: tell the processes whose answers it received (from
        a green thread of its own: a disconnect never waits for Redis)."""
        address = self._relayed.pop(client, None)
        if address is None:
            return

        def tell() -> None:
            try:
                self.cluster.publish_relay({"type": "left", "sink": address})
            except ClusterUnavailable:
                pass  # that answer ends as it would have; nothing else to do while Redis is away

        threading.Thread(target=tell, name="relay-left", daemon=True).start()

    # -- messages ---------------------------------------------------------------------------------
    def handle(self, message: dict[str, Any]) -> None:
        """One message from the relay channel (every process gets every message, its own included)."""
        kind, mine = message.get("type"), message.get("from") == self.cluster.instance
        if kind == "taken":
            waiting = self._waiting.get(str(message.get("id")))
            if waiting is not None:
                waiting.set()
        elif mine:
            return
        elif kind == "join" and isinstance(message.get("sink"), dict):
            self._join_here(str(message.get("chat")), message["sink"], message.get("id"))
        elif kind == "stop":
            if self.chat.runner.stop(ChatJob.kind, str(message.get("chat"))):
                log.info("event=chat_stop_taken chat=%s by=%s", message.get("chat"), message.get("from"))
        elif kind == "left" and isinstance(message.get("sink"), dict):
            self._left_here(message["sink"])

    def _join_here(self, chat_id: str, address: dict[str, Any], request_id: Any) -> None:
        """When this process is answering `chat_id`: add the remote client to its audience (or, when
        the answer is just ending, send it the answer as stored) and say so."""
        if self.chat.runner.get(ChatJob.kind, chat_id) is None or self.sink_for is None:
            return
        sink = self.sink_for(address)
        sink.client = remote_client_id(address)  # type: ignore[attr-defined]
        try:
            self.chat.join(chat_id, sink)
        except NotFound:  # deleted meanwhile: the asker shows what it finds
            return
        self.cluster.publish_relay({"type": "taken", "id": request_id})
        log.info("event=chat_join_taken chat=%s", chat_id)

    def _left_here(self, address: dict[str, Any]) -> None:
        """A remote client went away: the answers it alone received stop after the grace period, as
        for a client of this process (web_ui.sockets.on_disconnect)."""
        orphans = self.chat.runner.client_left(remote_client_id(address))
        if orphans:
            time.sleep(self.chat.settings.orphan_grace_s)  # green under eventlet: its own thread
            for job in orphans:
                self.chat.runner.cancel_if_orphaned(job)

"""An in-process Flower Grid for tests of the strategy: each node is a real ClientApp called in this process.

Every message goes through Flower's own objects (Message, RecordDict, ArrayRecord, the ClientApp and
its mods); what it leaves out is the network, which tests/flower/test_deployment.py covers. A reply
is computed when it is first pulled (as a reply that has arrived at the SuperLink would be), so the
number of replies alive at once is what the strategy holds.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.clientapp import ClientApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.serverapp import Grid


class LoopbackGrid(Grid):
    def __init__(self, apps: dict[int, ClientApp], run_config: dict | None = None,
                 node_configs: dict[int, dict] | None = None, silent: Iterable[int] = (),
                 tamper: Callable[[int, Message], Message] | None = None, run_id: int = 7) -> None:
        self.apps = apps
        self.silent = set(silent)  # nodes that never answer
        self.tamper = tamper  # (node, reply) -> reply: a site or network that changes what is sent
        self.contexts = {n: Context(run_id, n, dict((node_configs or {}).get(n, {})), RecordDict(),
                                    dict(run_config or {})) for n in apps}
        self._run = Run.create_empty(run_id)
        # What a ServerApp process is told by Flower's runtime; Message() reads it.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 1
        self._queued: dict[str, Message] = {}
        self.live_replies: weakref.WeakSet = weakref.WeakSet()
        self.max_live = 0
        self.pushed: list[Message] = []
        self._next = 0

    @property
    def run(self) -> Run:
        return self._run

    def set_run(self, run: Run) -> None:
        self._run = run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self.apps)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for m in messages:
            self._next += 1
            mid = f"m{self._next}"
            m.metadata.__dict__["_message_id"] = mid
            self._queued[mid] = m
            self.pushed.append(m)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        out = []
        for mid in message_ids:
            msg = self._queued.get(mid)
            node = None if msg is None else msg.metadata.dst_node_id
            if msg is None or node in self.silent:
                continue
            del self._queued[mid]
            try:
                reply = self.apps[node](msg, self.contexts[node])
            except Exception as exc:  # what Flower's ClientApp runtime sends back (flwr/supernode/runtime)
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                      reason=f"{type(exc)}:<'{exc}'>"), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = node
            if self.tamper is not None:
                reply = self.tamper(node, reply)
            self.live_replies.add(reply)
            self.max_live = max(self.max_live, len(self.live_replies))
            out.append(reply)
        return out

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))

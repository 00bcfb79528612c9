"""Flower's side of a strategy test, faked: a Grid with a node table, and site replies as Flower
delivers them (tests/orchestration/test_strategy.py, test_adversarial_hooks.py,
tests/federation/test_transfer.py)."""

from __future__ import annotations

from flwr.app import Error, Message, MessageType, RecordDict
from flwr.proto.node_pb2 import NodeInfo

#: node id -> the site name its key was registered under (the SuperLink's node table).
REGISTERED: dict[int, str] = {}


class FakeGrid:
    """The part of a Flower Grid that node sampling and site identity use."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def get_nodes(self) -> list[NodeInfo]:
        return [NodeInfo(node_id=n, name=REGISTERED.get(n, "")) for n in self.node_ids]


def reply(content: RecordDict | Error, node_id: int, registered_as: str | None = None) -> Message:
    """A site's reply as Flower delivers it: a reply to an instruction sent to ``node_id``.

    The node is registered as ``registered_as`` (default: the site the reply names, i.e. an
    honest site)."""
    if not isinstance(content, Error):
        REGISTERED[node_id] = registered_as or str(content["site"]["site-name"])
    instruction = Message(RecordDict(), dst_node_id=node_id, message_type=MessageType.TRAIN)
    return Message(content, reply_to=instruction)

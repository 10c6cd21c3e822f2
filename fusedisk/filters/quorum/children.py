"""The quorum's ChildSet (graph/node.py): add and delete a child, as QEMU's
quorum offers bdrv_add_child / bdrv_del_child and nothing more.  Replacing a
child is the graph's job (graph/children.py: a copy onto a non-voting child,
then a swap in one transaction); the node only keeps its children and their
states consistent.  Call both while the disk is drained, or (add, not voting)
just before a drain: see graph/children.py.
"""

from __future__ import annotations

import re
import weakref
from typing import TYPE_CHECKING

from fusedisk.errors import ControlError
from fusedisk.filters.quorum.health import RESYNCING, ChildState
from fusedisk.graph.edge import Edge
from fusedisk.graph.node import Node, Role

if TYPE_CHECKING:
    from fusedisk.filters.quorum.node import QuorumNode


def slot_order(name: str) -> tuple[int, str]:
    """`children.2` before `children.2.new` before `children.10`."""
    found = re.match(r"[^.]*\.(\d+)", name)
    return (int(found.group(1)) if found else 1 << 30, name)


class QuorumChildren:
    """The ChildSet of one quorum node."""

    def __init__(self, node: QuorumNode) -> None:
        self.node = node
        #: per deleted voter, its state by edge name, put back if it comes back to that
        #: name (a swap undone: a failed child stays failed, its data stale); weak, so
        #: a node closed for good takes its entry with it
        self._deleted: weakref.WeakKeyDictionary[Node, dict[str, ChildState]] = (
            weakref.WeakKeyDictionary()
        )

    def add_child(self, node: Node, name: str, voting: bool) -> Edge:
        """Attach `node` as child `name`: a voter, or written and never read (being
        filled: state `resyncing`).  A child being filled needs a quorum to fill it
        from, so it is refused while fewer than vote-threshold children serve."""
        q = self.node
        if name in q.children:
            raise ControlError(f"node '{q.name}': it already has a child '{name}'")
        voters = len(q._voters())
        if not voting and voters < q.threshold:
            raise ControlError(
                f"node '{q.name}': child '{name}': only {voters} children in service, "
                f"{q.threshold} needed to resync a new one"
            )
        if node.size != q.size:
            raise ControlError(
                f"node '{q.name}': child '{name}': '{node.name}' has {node.size} bytes, "
                f"the quorum {q.size}"
            )
        before = self._deleted.get(node, {}).pop(name, None)
        if before is not None and voting:
            state = before
        else:
            state = ChildState() if voting else ChildState(state=RESYNCING)
        q.child_state[name] = state
        edge = Edge(q, name, Role.CHILDREN, node)
        q.children[name] = edge
        ordered = sorted(q.children.items(), key=lambda item: slot_order(item[0]))
        q.children.clear()  # in place: the dict is the node's, others may hold it
        q.children.update(ordered)
        return edge

    def del_child(self, edge: Edge) -> None:
        """Detach the child; a voter's state is kept for `add_child` of the same node."""
        q = self.node
        if q.children.get(edge.name) is not edge:
            return
        del q.children[edge.name]
        state = q.child_state.pop(edge.name)
        if state.state != RESYNCING:
            self._deleted.setdefault(edge.node, {})[edge.name] = state
        edge.detach()

"""Eager start: the loop runs a handler's coroutine one step itself, and a task is
made only for a request that really waits.

Why: trio starts a task per `start_soon` (a Task, a context copy, a pass of the
scheduler: 14% of the daemon's samples at QD1 before this), and most disk
requests never wait: a read the host page cache holds, a write that
write-behind queues.  So a loop sends the coroutine its first `None`; if it
finishes (StopIteration), the reply goes out in the same pass.

If it suspends instead, it has yielded one of trio's traps, and whatever it
waits on (a parking lot, a cancel scope, the io_uring's table of waiters) now
names the loop's own task: the coroutine cannot move to another task.  So the
loop's task stays with it (`resume` goes on from the trap it yielded, as an
`await` would) and a new loop task takes over the descriptor or the ring.
Cancellation and values pass through unchanged: `resume` is what `await`
does, from the second step on.
"""

from __future__ import annotations

import types
from collections.abc import Coroutine, Generator
from typing import Any

Reply = Coroutine[Any, Any, bytes]


class Waiting:
    """A request whose handler suspended in its first step (run by a loop): the task
    that ran that step must see it to its end, since what it waits on is bound to it."""

    __slots__ = ("call", "nodeid", "opcode", "trap", "unique")

    def __init__(self, unique: int, call: Reply, trap: Any, opcode: int, nodeid: int) -> None:
        self.unique = unique
        self.call = call
        self.trap = trap
        self.opcode = opcode
        self.nodeid = nodeid


@types.coroutine
def resume(call: Reply, trap: Any) -> Generator[Any, Any, bytes]:
    """Go on with a coroutine whose first step already ran and yielded `trap`: what
    `await call` does, from its second step on (trio's traps pass through)."""
    while True:
        try:
            sent = yield trap
        except BaseException as e:
            try:
                trap = call.throw(e)
            except StopIteration as done:
                return done.value
        else:
            try:
                trap = call.send(sent)
            except StopIteration as done:
                return done.value

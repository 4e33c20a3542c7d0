"""A task's build in a bank (its replica and folded tensors, and who uses them) and the lease that
holds one while a call runs (:meth:`liedeploy.AdapterBank.lease`)."""

from __future__ import annotations

from typing import Callable, Optional

from torch import nn

__all__ = ["Folded", "TaskLease"]


class Folded:
    """One build of a task: its replica and folded tensors, and who is using them."""

    __slots__ = ("replica", "tensors", "recyclable", "users", "leaked", "retired", "nbytes")

    def __init__(self, replica: nn.Module, tensors: dict, recyclable: list, nbytes: int):
        self.replica, self.tensors, self.recyclable, self.nbytes = replica, tensors, recyclable, nbytes
        self.users = 0
        self.leaked = False  # handed out by model_for(): never recycled
        self.retired = False  # evicted or removed: recycled once no call uses it


class TaskLease:
    """One task's module held from :meth:`AdapterBank.lease` until :meth:`release` (idempotent).

    ``release_build(folded)`` gives the build back to its bank; ``note_uses(task, uses)`` counts uses.
    """

    __slots__ = ("_release_build", "_note_uses", "_folded", "model", "task")

    def __init__(self, task: Optional[str], folded: Optional[Folded], model: nn.Module,
                 release_build: Callable[[Folded], None], note_uses: Callable[[str, int], None]):
        self.task, self._folded, self.model = task, folded, model
        self._release_build, self._note_uses = release_build, note_uses

    def use(self, uses: int = 1) -> None:
        """Count ``uses`` more uses of the held task (requests it serves), for the bank's cache."""
        if self.task is not None:
            self._note_uses(self.task, uses)

    def release(self) -> None:
        folded, self._folded = self._folded, None
        if folded is not None:
            self._release_build(folded)

    def __enter__(self) -> "TaskLease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

"""Task helpers: walking the guest kernel's task list.

Owns :func:`for_each_task` (thread-group leaders, the processes ``/proc`` lists, from
``init_task.tasks``), :func:`for_each_thread` (every thread of one process),
:func:`task_info` (pid, tgid, comm, mm of one ``task_struct``) and :func:`proc_name`
(the name ``/proc/PID/stat`` shows: a kernel thread's full name, a workqueue worker's
comm followed by ``+desc`` or ``-desc``). Each list step checks
that the next node's ``prev`` points back and that no node repeats; a list longer than
guest RAM can hold tasks (:func:`task_limit`) or a broken link raises
:class:`~libshare.introspect.kernel.WalkError`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from libshare.introspect.helpers.lists import list_for_each
from libshare.introspect.kernel import Kernel, WalkError

MAX_TASKS = 1 << 20
#: the smallest task_struct assumed when the layout does not give its size (a real
#: one is 3-10 KiB)
MIN_TASK_SIZE = 1024
PF_WQ_WORKER = 0x00000020
PF_KTHREAD = 0x00200000
PROC_NAME_LEN = 64  # the tcomm buffer of fs/proc/array.c
WORKER_DESC_LEN = 24


@dataclass(frozen=True)
class Task:
    """One task: its ``task_struct`` address, pid, tgid, comm and ``mm`` (0 for kernel
    threads), and ``name`` as /proc/PID/stat shows it (see :func:`proc_name`)."""

    addr: int
    pid: int
    tgid: int
    comm: str
    mm: int
    name: str = ""


def task_limit(k: Kernel) -> int:
    """Return the most tasks guest RAM can hold (each is a distinct ``task_struct``),
    at most :data:`MAX_TASKS`: the bound of every task and thread list walk."""
    size = max(k.layout.size("task_struct"), MIN_TASK_SIZE)
    return max(1, min(MAX_TASKS, k.mem.ram_size // size))


def for_each_task(k: Kernel) -> Iterator[int]:
    """Yield the ``task_struct`` address of every thread-group leader (every process
    and kernel thread ``/proc`` lists; the idle task pid 0 is not included)."""
    off = k.layout.off("task_struct.tasks")
    for node in list_for_each(k, k.info.init_task + off, task_limit(k)):
        yield node - off


def for_each_thread(k: Kernel, task: int) -> Iterator[int]:
    """Yield the ``task_struct`` address of every thread in ``task``'s thread group,
    the leader first."""
    lay = k.layout
    if lay.has("task_struct.thread_group"):
        off = lay.off("task_struct.thread_group")
        leader = k.field(task, "task_struct.group_leader")
        yield leader
        for node in list_for_each(k, leader + off, task_limit(k)):
            yield node - off
        return
    if lay.has("signal_struct.thread_head") and lay.has("task_struct.thread_node"):
        off = lay.off("task_struct.thread_node")
        signal = k.field(task, "task_struct.signal")
        for node in list_for_each(k, signal + lay.off("signal_struct.thread_head"),
                                  task_limit(k)):
            yield node - off
        return
    yield task


def task_info(k: Kernel, task: int) -> Task:
    """Return the :class:`Task` for the ``task_struct`` at ``task``."""
    lay = k.layout
    comm = k.cstring(task + lay.off("task_struct.comm"), 16).decode("utf-8", "replace")
    return Task(task, k.u32(task + lay.off("task_struct.pid")),
                k.u32(task + lay.off("task_struct.tgid")),
                comm, k.field(task, "task_struct.mm"), proc_name(k, task, comm))


def _to_kthread(k: Kernel, task: int) -> int:
    """Return ``to_kthread(task)``: ``worker_private`` (>= 5.19) or ``set_child_tid``."""
    lay = k.layout
    for key in ("task_struct.worker_private", "task_struct.set_child_tid"):
        if lay.has(key):
            return k.u64(task + lay.off(key))
    return 0


def proc_name(k: Kernel, task: int, comm: str) -> str:
    """Return the name /proc/PID/stat shows for ``task`` whose comm is ``comm``: a
    kernel thread's ``kthread->full_name`` when it has one (Linux >= 5.17), a
    workqueue worker's comm plus ``+desc`` (busy) or ``-desc``; else ``comm``. Kernel
    data that cannot be read leaves ``comm``."""
    lay = k.layout
    if not lay.has("task_struct.flags"):
        return comm
    try:
        flags = k.u32(task + lay.off("task_struct.flags"))
        if not flags & PF_KTHREAD:
            return comm
        kthread = _to_kthread(k, task)
        if not kthread or not k.valid(kthread):
            return comm
        if flags & PF_WQ_WORKER:
            if not (lay.has("kthread.data") and lay.has("worker.desc")):
                return comm
            worker = k.u64(kthread + lay.off("kthread.data"))
            if not worker or (lay.has("worker.pool")
                              and not k.u64(worker + lay.off("worker.pool"))):
                return comm
            desc = k.cstring(worker + lay.off("worker.desc"), WORKER_DESC_LEN)
            if not desc:
                return comm
            busy = lay.has("worker.current_work") and \
                k.u64(worker + lay.off("worker.current_work"))
            name = f"{comm}{'+' if busy else '-'}{desc.decode('utf-8', 'replace')}"
            return name[:PROC_NAME_LEN - 1]
        if lay.has("kthread.full_name"):
            full = k.u64(kthread + lay.off("kthread.full_name"))
            if full:
                return k.cstring(full, PROC_NAME_LEN - 1).decode("utf-8", "replace")
    except WalkError:
        return comm
    return comm

"""Item transport from an actor process to the learner's process: a ring of shared-memory slots.

One ring per actor process (single producer, single consumer). Its S slots are preallocated in
one shared-memory block, shaped by the adder's item specs: field f of slot s is an array
[slot_rows, *spec.shape]. Nothing is pickled per item or per step:

    actor process (RingWriter.write)              learner process (RingReader, receiver thread)
    --------------------------------              ---------------------------------------------
    free.acquire()     (blocks while all S        full.acquire()      (blocks while nothing is
                        slots wait: backpressure)                       published)
    slot[w][:n] = items   (in place)              table.insert(slot[r][:n])   (blocks while the
    rows[w] = n                                                          rate limiter says no)
    full.release() ──────────────────────────────▶ free.release() x S/2 ──▶ (slots free again, in
                                                  batches: once S/2 slots are consumed, or the
                                                  ring is empty)

Backpressure is explicit and nothing is dropped: when the table's rate limiter refuses inserts,
the receiver blocks in `table.insert`, the ring fills, and the actor blocks in `free.acquire`.
Both semaphores are POSIX semaphores (multiprocessing's), which are also memory barriers, so a
slot's contents are visible to the reader before its `full` token is. Waits use timeouts only to
notice a stop request or a dead peer; nothing spins.

A batch of more than `slot_rows` items is split over several slots. `depth()` (published minus
consumed slots) is what the figures report as the queue depth. `published_rows()` counts the rows
of every slot published so far, exactly as of the head even when the writer was killed mid-write:
the writer stores the running total for head h + 1 in `_cum[(h + 1) % 2]` before it moves the head
to h + 1, and a write in progress touches only the other entry.
"""

from __future__ import annotations

import threading
import time
from typing import Mapping, Optional

import numpy as np

from rlflow.errors import ClosedError, SpecError, Timeout, UsageError, mismatch
from rlflow.runtime.shm import SharedArrays, tracked, unlink_semaphore
from rlflow.specs import ArraySpec, batch_rows

_HEAD, _TAIL = 0, 1          # counters: slots published (writer), slots consumed (reader)


def slot_bytes(specs: Mapping[str, ArraySpec], slot_rows: int) -> int:
    return sum(int(np.prod(s.shape, dtype=np.int64)) * s.dtype.itemsize for s in specs.values()) * slot_rows


class Ring:
    """The parent's side: owns the shared block and the two semaphores of one actor's ring.

    `ctx` is the multiprocessing context that starts the actor process; `writer_args()` is what the
    actor process needs (pass it as a Process argument: semaphores cross only while spawning).
    """

    def __init__(self, specs: Mapping[str, ArraySpec], slot_rows: int, slots: int, ctx, wake=None):
        if not specs:
            raise UsageError(mismatch("Ring", "specs", "a non-empty dict field -> ArraySpec", repr(specs)))
        if slot_rows < 1 or slots < 1:
            raise UsageError(mismatch("Ring", "slot_rows/slots", ">= 1", (slot_rows, slots)))
        self.specs = dict(specs)
        self.slot_rows = int(slot_rows)
        self.slots = int(slots)
        arrays = {"_rows": ((self.slots,), np.int64), "_counters": ((2,), np.int64), "_cum": ((2,), np.int64)}
        self._fields = list(self.specs)
        for i, (name, s) in enumerate(self.specs.items()):
            arrays[f"f{i}"] = ((self.slots, self.slot_rows) + s.shape, s.dtype)
        self.block = SharedArrays(arrays, named=True)
        # until the actor has attached, the name must outlive even a SIGKILLed creator: the resource
        # tracker (a process of its own) unlinks it then; `unlink` and `close` unregister it
        self._tracked = tracked(self.block.name)
        self.free = ctx.Semaphore(self.slots)
        self.full = ctx.Semaphore(0)
        self.wake = wake          # optional semaphore shared by several rings: "some slot was published"

    def writer_args(self):
        return (self.block.handle(), self._fields, self.specs, self.slot_rows, self.slots, self.free,
                self.full, self.wake)

    def reader(self) -> "RingReader":
        return RingReader(self)

    def depth(self) -> int:
        c = self.block.arrays.get("_counters")
        return 0 if c is None else int(c[_HEAD] - c[_TAIL])

    def published_rows(self) -> int:
        """Rows the writer has published (in slots it handed over), in all; exact for a dead writer."""
        a = self.block.arrays
        if "_cum" not in a:
            return 0
        return int(a["_cum"][int(a["_counters"][_HEAD]) & 1])

    def unlink(self) -> None:
        """Remove the segment's name once the writer has attached (its mapping stays valid)."""
        self._untrack()
        self.block.unlink()

    def _untrack(self) -> None:
        if self._tracked:
            self._tracked = False
            tracked(self.block.name, False)

    def close(self) -> None:
        """Free the block, and the semaphores' names (the writer, whether it started or not, opens
        them no more: a restarted actor gets a new ring)."""
        self._untrack()
        self.block.close()
        unlink_semaphore(self.free)
        unlink_semaphore(self.full)


class RingReader:
    """Consumer side (learner process): `get` a published slot, read its views, `release` it."""

    def __init__(self, ring: Ring):
        self.ring = ring
        a = ring.block.arrays
        self._rows = a["_rows"]
        self._counters = a["_counters"]
        self._cols = [(name, a[f"f{i}"]) for i, name in enumerate(ring._fields)]
        self._next = 0
        self._held = None         # a slot taken by `pump` that the table refused so far
        self._unfreed = 0         # consumed slots not yet handed back to the writer
        self._free_batch = max(1, ring.slots // 2)

    def get(self, timeout: Optional[float]) -> Optional[dict]:
        """The next published slot as field -> view [n, ...] (valid until `release`), or None if
        none was published within `timeout`."""
        full = self.ring.full
        # acquire(timeout=0) costs ~70 us when empty (sem_timedwait); a non-blocking try costs ~0
        if not full.acquire(block=False):
            self._hand_back()         # nothing to read: the writer gets every consumed slot back
            if not timeout or not full.acquire(timeout=timeout):
                return None
        s = self._next
        n = int(self._rows[s])
        return {name: arr[s, :n] for name, arr in self._cols}

    def pump(self, insert, until: Optional[float] = None, most: Optional[int] = None) -> int:
        """Inline receiving: insert the published slots the table takes now (`insert(items)` returns
        False when the rate limiter refuses; the slot then stays for the next call), at most one
        ring's worth (`slots`; or `most`), and none after the time.monotonic() `until`: a writer that
        publishes as fast as the slots are inserted would otherwise keep the caller (the learner's
        thread) here for ever. A stopped writer's ring holds at most `slots`. Returns the slots moved."""
        moved = 0
        most = self.ring.slots if most is None else most
        while moved < most and (until is None or not moved or time.monotonic() < until):
            if self._held is None:
                self._held = self.get(None)
                if self._held is None:
                    return moved
            if not insert(self._held):
                return moved
            self._held = None
            self.release()
            moved += 1
        return moved

    def head_rows(self) -> Optional[int]:
        """Rows of the oldest published slot not yet consumed (the next to insert), or None."""
        c = self._counters
        return int(self._rows[self._next]) if int(c[_HEAD]) > int(c[_TAIL]) else None

    def pending_rows(self) -> int:
        """Rows in published slots not yet consumed (call when the writer is stopped)."""
        return sum(int(self._rows[s]) for s in self._pending_slots())

    def _pending_slots(self, head: Optional[int] = None) -> list[int]:
        """The published slots not yet consumed (up to `head`, else the head now), oldest first."""
        c = self._counters
        head = int(c[_HEAD]) if head is None else head
        return [(self._next + k) % self.ring.slots for k in range(head - int(c[_TAIL]))]

    def snapshot(self) -> tuple[list[dict], int]:
        """(copies of the published slots not yet consumed, oldest first, field -> [n, ...] each; the
        rows the writer had published in all) as of one read of the head, safe while the writer runs
        (it never touches a slot between the tail and that head): a slot published after is in
        neither. (Read apart, a checkpoint's in-flight items held slots its published count, read
        before them, did not.)"""
        c, cum = self._counters, self.ring.block.arrays["_cum"]
        while True:
            head = int(c[_HEAD])
            published = int(cum[head & 1])
            if int(c[_HEAD]) == head:         # the head unmoved: cum[head & 1] was head's (the writer
                break                         # rewrites it in the write after head + 1, before its head store)
        items = [{name: arr[s, :int(self._rows[s])].copy() for name, arr in self._cols}
                 for s in self._pending_slots(head)]
        return items, published

    def release(self) -> None:
        """Done with the slot from `get`. Consumed slots go back to the writer in batches of half
        the ring (or all at once when the ring runs empty): a writer blocked on a full ring then
        wakes once per batch, not once per slot (a cross-process wake-up costs tens of us)."""
        self._next = (self._next + 1) % self.ring.slots
        self._counters[_TAIL] += 1
        self._unfreed += 1
        if self._unfreed >= self._free_batch:
            self._hand_back()

    def close(self) -> None:
        """Drop this reader's views of the ring (the ring's `close` can then unmap it at once)."""
        self._rows = self._counters = None
        self._cols = []
        self._held = None

    def drained(self) -> bool:
        """Whether no published slot waits (for a ring whose writer is gone: it never will)."""
        return self._held is None and self.head_rows() is None

    def _hand_back(self) -> None:
        free = self.ring.free
        for _ in range(self._unfreed):
            free.release()
        self._unfreed = 0


class RingWriter:
    """Producer side (actor process): `write(items)` copies a batch into free slots in place.

    `should_stop()` is polled while waiting for a free slot (every `poll` seconds); when it says
    True, `write` raises ClosedError. Fields, shapes and dtypes are checked against the specs (no
    silent broadcasting), unless `trusted`: items from rlflow's own adders, built to these specs."""

    def __init__(self, args, should_stop=lambda: False, poll: float = 0.2, trusted: bool = False):
        handle, fields, specs, slot_rows, slots, free, full, wake = args
        self._trusted = trusted   # items built to the specs already (rlflow's adders): no check
        self.block = SharedArrays.attach(handle)
        a = self.block.arrays
        self.specs = specs
        self.slot_rows = slot_rows
        self.slots = slots
        self.free, self.full, self.wake = free, full, wake
        self._rows = a["_rows"]
        self._counters = a["_counters"]
        self._cum = a["_cum"]
        self._cols = [(name, a[f"f{i}"], specs[name]) for i, name in enumerate(fields)]
        self._slots = [{name: arr[s] for name, arr, _ in self._cols} for s in range(slots)]   # field -> view
        self._head = int(self._counters[_HEAD])
        self._published = int(self._cum[self._head & 1])
        self._next = 0
        self._should_stop = should_stop
        self._poll = poll
        self.blocked_seconds = 0.0
        self.unsent = 0
        """Rows of the last `write` that a stop request left unpublished (its ClosedError came after
        the slots before them were published): the run counts them as in flight, not as lost."""

    def _check(self, items) -> int:
        if len(items) != len(self._cols) or any(name not in items for name, _, _ in self._cols):
            missing = [name for name, _, _ in self._cols if name not in items]
            extra = [k for k in items if k not in self.specs]
            field = (missing or extra or ["?"])[0]
            raise SpecError(mismatch("item field", field, f"fields {sorted(self.specs)}",
                                     f"fields {sorted(items)} (missing {missing}, unknown {extra})"))
        n = None
        for name, _, spec in self._cols:
            a = items[name]
            if not (a.__class__ is np.ndarray and a.shape[1:] == spec.shape and a.ndim == len(spec.shape) + 1
                    and a.dtype == spec.dtype):
                a = spec.validate(a, name, what="item field")
            if n is None:
                n = a.shape[0]
            elif a.shape[0] != n:
                raise SpecError(mismatch("item field", name, f"batch size {n} like the other fields",
                                         f"batch size {a.shape[0]}"))
        return n or 0

    def _acquire(self):
        if self.free.acquire(block=False):
            return
        import time

        t = time.monotonic()
        while not self.free.acquire(timeout=self._poll):
            if self._should_stop():
                raise ClosedError("the run is stopping")
        self.blocked_seconds += time.monotonic() - t

    def wait_taken(self) -> None:
        """Wait until every published slot was taken by the reader (a free slot for each), or
        the run stops: a ring of one slot then adds no buffering beyond the table's own."""
        held = 0
        try:
            for _ in range(self.slots):
                self._acquire()
                held += 1
        except ClosedError:
            pass                    # stopping: what was published stays published
        finally:
            for _ in range(held):
                self.free.release()

    def write(self, items: Mapping[str, np.ndarray]) -> None:
        n = len(items[self._cols[0][0]]) if self._trusted else self._check(items)
        start = 0
        while start < n:
            k = min(self.slot_rows, n - start)
            whole = k == n                       # the usual case: one slot, whole arrays
            try:
                self._acquire()
            except ClosedError:
                self.unsent = n - start
                raise
            s = self._next
            if whole and k == self.slot_rows:    # whole arrays into whole slots: no slicing (~3 -> ~1.5 us)
                for name, view in self._slots[s].items():
                    view[...] = items[name]
            else:
                for name, view in self._slots[s].items():
                    view[:k] = items[name] if whole else items[name][start:start + k]
            self.commit(k)
            start += k

    __call__ = write

    def reserve(self, n: int):
        """The next free slot's arrays (field -> [n, ...] views into shared memory) for the caller to
        fill and `commit(n)` (or `cancel()`); None unless `n` fills one slot exactly and the writer
        is `trusted` (then `write` the items). Waits for a free slot as `write` does (ClosedError
        when the run stops, with `unsent` = n)."""
        if n != self.slot_rows or not self._trusted:     # an untrusted writer checks items: `write`
            return None
        try:
            self._acquire()
        except ClosedError:
            self.unsent = n
            raise
        return self._slots[self._next]

    def cancel(self) -> None:
        """Give back the slot `reserve` took, unpublished."""
        self.free.release()

    def commit(self, n: int) -> None:
        """Publish the slot `reserve` lent, now filled with `n` rows."""
        s = self._next
        self._rows[s] = n
        self._next = s + 1 if s + 1 < self.slots else 0
        self._published += n                 # the total as of the head about to be (module doc)
        self._cum[(self._head + 1) & 1] = self._published
        self._head += 1                      # this writer alone moves the head
        self._counters[_HEAD] = self._head
        self.full.release()
        if self.wake is not None:
            self.wake.release()


class Receiver(threading.Thread):
    """Learner process: moves one ring's slots into the table (`insert(items, timeout=..., then=...)`
    blocks while the rate limiter refuses, and calls `then()` once the items are in). Exits when `stop` is set and the ring is drained, or when told the
    writer is gone (`drain_and_stop`). An exception is kept in `.error` and `on_error` is called."""

    def __init__(self, ring: Ring, insert, on_error, name: str):
        super().__init__(name=name, daemon=True)
        self.ring = ring
        self.reader = ring.reader()
        self.insert = insert
        self.on_error = on_error
        self.error: Optional[BaseException] = None
        self.items = 0
        self._halt = threading.Event()
        self._drain = threading.Event()

    def drain_and_stop(self):
        """The writer is dead: insert what it published, then exit."""
        self._drain.set()

    def stop(self):
        self._halt.set()

    def run(self):
        try:
            while not self._halt.is_set():
                draining = self._drain.is_set()
                items = self.reader.get(timeout=0 if draining else 0.1)
                if items is None:
                    if draining:
                        return
                    continue
                n = batch_rows(items)
                while True:            # the rate limiter may refuse for a while: wait in steps,
                    try:               # so a stop request is noticed (the table stays open)
                        # the slot is released where it was inserted (under the run's checkpoint
                        # gate): no checkpoint sees it both in the table and in the ring
                        self.insert(items, timeout=0.2, then=self.reader.release)
                        break
                    except Timeout:
                        if self._halt.is_set():
                            return
                self.items += n
        except ClosedError:
            return
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self.error = e
            self.on_error(e)

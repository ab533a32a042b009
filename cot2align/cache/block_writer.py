"""The writer thread of a teacher pass: it assembles each block's rows on the host from the batches the teacher
produces (in any order, each example's rows placed by its offsets), writes the block's chunks and only then
commits the part's progress (the commit protocol in format.py). The teacher's next batches run meanwhile.

    writer = BlockWriter(cache_writer, specs, block_starts, offsets, part, on_commit)
    writer.start()
    writer.put(("batch", block, (event, host_tensors, [(example, view, n_rows), ...])))   # any number
    writer.put(("end", block, None))                                                        # the block is whole
    writer.put(None); writer.join()                                                         # no more blocks
An error in the thread is raised again in the producer at its next `put`.
"""

from __future__ import annotations

import queue
import threading
import time

import numpy as np

from cot2align.cache.format import VIEWS, to_storage
from cot2align.cache.writer import CacheWriter
from cot2align.faults import fault_point


class BlockWriter(threading.Thread):
    """Receives batches of device tensors, assembles each block on the host, writes and commits it."""

    def __init__(self, writer: CacheWriter, specs: dict, block_starts: list[int], offsets: dict[str, np.ndarray],
                 part: int, on_commit):
        super().__init__(daemon=True)
        self.writer, self.specs, self.block_starts, self.offsets = writer, specs, block_starts, offsets
        self.part = part
        self.part_row0 = {v: writer.manifest["store"]["parts"][part]["rows"][v][0] for v in VIEWS}
        self.on_commit = on_commit
        self.inbox: queue.Queue = queue.Queue(maxsize=8)
        self.error: BaseException | None = None
        self.buffers: dict | None = None
        self.write_seconds = 0.0

    def _new_buffers(self, block: int) -> dict:
        a, b = self.block_starts[block], self.block_starts[block + 1]
        buffers = {}
        for view in VIEWS:
            rows = int(self.offsets[view][b] - self.offsets[view][a])
            buffers[view] = {name: np.zeros((rows, *spec["trailing"]), dtype=spec["dtype"])
                             for name, spec in self.specs.items()}
        return buffers

    def run(self) -> None:
        try:
            while (message := self.inbox.get()) is not None:
                kind, block, payload = message
                if self.buffers is None:
                    self.buffers = self._new_buffers(block)
                if kind == "batch":
                    self._place(block, *payload)
                else:  # "end"
                    self._write_and_commit(block)
        except BaseException as e:  # surfaced to the main thread
            self.error = e
            self._drain()

    def _place(self, block: int, event, host: dict, placements: list) -> None:
        """Copy a batch's rows (on the host once `event` is done) into the block's buffers."""
        if event is not None:
            event.synchronize()  # the device->host copies of this batch are done
        block_row0 = {v: int(self.offsets[v][self.block_starts[block]]) for v in VIEWS}
        cursor = 0
        for example, view, n_rows in placements:
            dest = int(self.offsets[view][example]) - block_row0[view]
            for name, tensor in host.items():
                rows = tensor[cursor:cursor + n_rows].numpy()
                self.buffers[view][name][dest:dest + n_rows] = to_storage(rows, self.specs[name]["dtype"])
            cursor += n_rows

    def _write_and_commit(self, block: int) -> None:
        """Write the whole block, then (only then) move the manifest's progress past it."""
        t0 = time.perf_counter()
        for view in VIEWS:
            row0 = int(self.offsets[view][self.block_starts[block]]) - self.part_row0[view]
            self.writer.write_rows(self.part, view, row0, self.buffers[view])
            fault_point(f"write:{block}:{view}")
        self.write_seconds += time.perf_counter() - t0
        fault_point(f"commit:{block}")
        self.on_commit(block)
        self.buffers = None

    def _drain(self) -> None:
        """After an error: keep emptying the inbox so the producer never blocks forever."""
        while True:
            try:
                if self.inbox.get(timeout=0.1) is None:
                    return
            except queue.Empty:
                continue

    def put(self, message) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.inbox.put(message, timeout=0.5)
                return
            except queue.Full:
                continue

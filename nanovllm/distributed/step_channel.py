"""How a ScheduledStep gets from rank 0 to the workers: pickled once, then one of two transports.

  ShmChannel    one host: rank 0 writes the pickle into one of two shared-memory slots and wakes
                each worker's semaphore (nano-vllm's way); a worker acknowledges in the header, so
                rank 0 never overwrites a slot that is still being read.
  GlooChannel   any hosts: a gloo broadcast over the group's CPU group of one fixed-size packet
                (header + pickle), and a second broadcast for whatever does not fit.
Measured per step on both (scripts/bench_step_channel.py, claude_docs/performance.md); the
executor uses shared memory when every rank is on rank 0's host and gloo otherwise.

A message is a ScheduledStep, or None to tell the workers to exit.
"""
import os
import pickle
import struct
import time
from multiprocessing import shared_memory

import numpy as np
import torch
import torch.distributed as dist

PACKET_BYTES = 64 << 10   # gloo: one broadcast carries steps up to this size (decode at batch 256 ~ 30 KB)


class GlooChannel:

    def __init__(self, cpu_group, rank: int):
        self.group, self.rank = cpu_group, rank
        self.packet = torch.empty(PACKET_BYTES, dtype=torch.uint8)

    def send(self, message, alive=None):
        """alive: unused here (a broadcast to a dead peer fails by itself)."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        head = len(data).to_bytes(8, "little")
        fits = min(len(data), PACKET_BYTES - 8)
        packet = self.packet.numpy()
        packet[:8] = np.frombuffer(head, np.uint8)
        packet[8:8 + fits] = np.frombuffer(data, np.uint8, count=fits)
        dist.broadcast(self.packet, 0, group=self.group)
        if fits < len(data):
            dist.broadcast(torch.frombuffer(bytearray(data[fits:]), dtype=torch.uint8), 0, group=self.group)

    def recv(self):
        dist.broadcast(self.packet, 0, group=self.group)
        packet = self.packet.numpy()
        size = int.from_bytes(packet[:8].tobytes(), "little")
        fits = min(size, PACKET_BYTES - 8)
        data = packet[8:8 + fits].tobytes()
        if fits < size:
            rest = torch.empty(size - fits, dtype=torch.uint8)
            dist.broadcast(rest, 0, group=self.group)
            data += rest.numpy().tobytes()
        return pickle.loads(data)

    def close(self):
        pass


class ShmChannel:
    """Header: int64 write_seq, then one int64 read_seq per worker; then two slots of slot_bytes,
    each [int64 length][pickle]. A message larger than a slot goes to a shared-memory segment of its own,
    named in the slot ([int64 -length][int64 name length][name]), unlinked once every worker has read
    it: slot_bytes_for bounds the usual steps, but penalties' histories (max_model_len ids a row) and
    logit_bias (up to the vocabulary a row) can exceed it (a 64-row decode step of penalized 4k-token
    requests pickles to 2.2 MB against a 1.8 MB slot; before, such a step raised at every try)."""

    def __init__(self, num_readers: int, slot_bytes: int, semaphores, name: str | None = None, reader: int = -1):
        self.num_readers, self.slot_bytes, self.reader = num_readers, slot_bytes, reader
        self.header_bytes = 8 * (1 + num_readers)
        size = self.header_bytes + 2 * slot_bytes
        self.owner = name is None
        self.shm = shared_memory.SharedMemory(name=name, create=self.owner, size=size if self.owner else 0)
        # Readers are spawned by the creator and share its resource tracker, which the creator's
        # unlink() tells: a reader's close() leaves the segment alone.
        self.header = np.ndarray((1 + num_readers,), dtype=np.int64, buffer=self.shm.buf)
        if self.owner:
            self.header[:] = 0
        self.semaphores = semaphores
        self.seq = 0
        self.parent = os.getppid()
        self.overflow = []   # rank 0: (seq, SharedMemory) of messages too large for a slot, until all read

    @property
    def name(self) -> str:
        return self.shm.name

    def _slot(self, seq: int) -> memoryview:
        start = self.header_bytes + (seq % 2) * self.slot_bytes
        return self.shm.buf[start:start + self.slot_bytes]

    def send(self, message, alive=None):
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self.seq += 1
        # The slot last held message seq-2: every worker must have read it.
        next_check = time.monotonic() + 0.01
        while int(self.header[1:].min()) < self.seq - 2:
            if alive is not None and time.monotonic() >= next_check:
                alive()  # raises if a worker has failed (every 10 ms)
                next_check = time.monotonic() + 0.01
            time.sleep(20e-6)
        self._free_overflow(int(self.header[1:].min()))
        slot = self._slot(self.seq)
        if len(data) + 8 <= self.slot_bytes:
            slot[:8] = struct.pack("<q", len(data))
            slot[8:8 + len(data)] = data
        else:  # larger than slot_bytes_for's bound: a segment of its own, named in the slot
            segment = shared_memory.SharedMemory(create=True, size=len(data))
            segment.buf[:len(data)] = data
            name = segment.name.encode()
            slot[:16] = struct.pack("<qq", -len(data), len(name))
            slot[16:16 + len(name)] = name
            self.overflow.append((self.seq, segment))
        self.header[0] = self.seq
        for sem in self.semaphores:
            sem.release()

    def recv(self):
        sem = self.semaphores[self.reader]
        while not sem.acquire(timeout=1.0):
            if os.getppid() != self.parent:
                raise RuntimeError("rank 0's process is gone")
        self.seq += 1
        slot = self._slot(self.seq)
        size = struct.unpack("<q", bytes(slot[:8]))[0]
        if size >= 0:
            data = bytes(slot[8:8 + size])
        else:
            length = struct.unpack("<q", bytes(slot[8:16]))[0]
            segment = shared_memory.SharedMemory(name=bytes(slot[16:16 + length]).decode())
            data = bytes(segment.buf[:-size])
            segment.close()
        self.header[1 + self.reader] = self.seq
        return pickle.loads(data)

    def _free_overflow(self, read_seq: int):
        """Unlink the overflow segments of the messages every worker has read (read_seq and before)."""
        while self.overflow and self.overflow[0][0] <= read_seq:
            _, segment = self.overflow.pop(0)
            segment.close()
            segment.unlink()

    def close(self):
        self.header = None
        self._free_overflow(self.seq)
        try:
            self.shm.close()
            if self.owner:
                self.shm.unlink()
        except (FileNotFoundError, BufferError):
            pass


def slot_bytes_for(config) -> int:
    """A step's worst case: every row's page list (twice with cascade levels), every token's id,
    position and slot, every row's structured-output token bitmask (Qwen3 vocabulary: 19 KB a row), the
    host-tier copies (a pair each way per page at most), plus room for the rest."""
    pages = config.max_num_seqs * -(-config.max_model_len // config.kvcache_block_size)
    bitmasks = config.max_num_seqs * 4 * -(-config.hf_config.vocab_size // 32)
    copies = 3 * 16 * pages if config.host_kvcache_gb > 0 else 0   # host-tier (page, page) pairs, int64: 3 lists
    return (1 << 20) + 3 * 4 * pages + 4 * 8 * config.max_num_batched_tokens + bitmasks + copies

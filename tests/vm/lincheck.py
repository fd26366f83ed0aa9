#!/usr/bin/env python3
"""Per-chunk linearizability through raw block devices (O_DIRECT, so every
request reaches canopy, not the page cache).

  lincheck.py write DEV ID CHUNK_SIZE CHUNKS COUNT LOG
      COUNT writes of a 4 KiB record (writer ID, sequence number, checksum)
      at the start of a random chunk among the first CHUNKS, logging each
      write's start and end on CLOCK_MONOTONIC.
  lincheck.py read DEV CHUNK_SIZE CHUNKS STOPFILE MAX LOG
      read random chunks until STOPFILE exists (or MAX reads), logging the
      record seen with the read's start and end. A torn or corrupt record
      fails at once.
  lincheck.py check LOG...
      Every read returns the initial zeros or a record some write produced;
      that write started before the read ended; and no other write of the
      chunk both started after that write ended and ended before the read
      started (which would make the value stale). Prints a summary.

All processes run in one VM, so their monotonic clocks agree.
"""
import hashlib
import mmap
import os
import random
import struct
import sys
import time

BLOCK = 4096
HEADER = struct.Struct("<IIQ")  # writer, chunk, seq


def record(writer, chunk, seq):
    head = HEADER.pack(writer, chunk, seq)
    digest = hashlib.sha256(head).digest()
    body = (head + digest) * (BLOCK // (len(head) + len(digest)))
    return body + bytes(BLOCK - len(body))


def parse(buf, chunk):
    """(writer, seq) of a record, (0, 0) for never-written zeros."""
    data = bytes(buf)
    if data == bytes(BLOCK):
        return (0, 0)
    writer, rchunk, seq = HEADER.unpack_from(data)
    if data != record(writer, rchunk, seq):
        sys.exit(f"FAIL: torn or corrupt record in chunk {chunk}: {data[:48].hex()}")
    if rchunk != chunk:
        sys.exit(f"FAIL: chunk {chunk} holds chunk {rchunk}'s record")
    return (writer, seq)


def open_direct(dev, write):
    flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_DIRECT
    return os.open(dev, flags)


def write(dev, writer, chunk_size, chunks, count, log):
    fd = open_direct(dev, True)
    buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT needs
    rng = random.Random(writer)
    with open(log, "w") as out:
        for seq in range(1, count + 1):
            chunk = rng.randrange(chunks)
            buf[:] = record(writer, chunk, seq)
            t0 = time.monotonic_ns()
            if os.pwritev(fd, [buf], chunk * chunk_size) != BLOCK:
                sys.exit("FAIL: short write")
            t1 = time.monotonic_ns()
            out.write(f"W {chunk} {writer} {seq} {t0} {t1}\n")
    os.close(fd)


def read(dev, chunk_size, chunks, stopfile, max_reads, log):
    fd = open_direct(dev, False)
    buf = mmap.mmap(-1, BLOCK)
    rng = random.Random(os.getpid())
    n = 0
    with open(log, "w") as out:
        while n < max_reads and not os.path.exists(stopfile):
            chunk = rng.randrange(chunks)
            t0 = time.monotonic_ns()
            if os.preadv(fd, [buf], chunk * chunk_size) != BLOCK:
                sys.exit("FAIL: short read")
            t1 = time.monotonic_ns()
            writer, seq = parse(buf, chunk)
            out.write(f"R {chunk} {writer} {seq} {t0} {t1}\n")
            n += 1
    os.close(fd)


def check(logs):
    writes = {}  # (chunk, writer, seq) -> (start, end)
    by_chunk = {}
    reads = []
    for path in logs:
        with open(path) as f:
            for line in f:
                kind, chunk, writer, seq, t0, t1 = line.split()
                key = (int(chunk), int(writer), int(seq))
                span = (int(t0), int(t1))
                if kind == "W":
                    writes[key] = span
                    by_chunk.setdefault(key[0], []).append(span)
                else:
                    reads.append((key, span))
    for (chunk, writer, seq), (r0, r1) in reads:
        spans = by_chunk.get(chunk, [])
        if writer == 0:
            # Zeros: legal only while no write of the chunk had completed.
            if any(w1 < r0 for (_, w1) in spans):
                sys.exit(f"FAIL: chunk {chunk} read as zeros after a write completed")
            continue
        span = writes.get((chunk, writer, seq))
        if span is None:
            sys.exit(f"FAIL: chunk {chunk} returned writer {writer} seq {seq}, never written there")
        w0, w1 = span
        if w0 > r1:
            sys.exit(f"FAIL: chunk {chunk} returned writer {writer} seq {seq} before it was written")
        if any(o0 > w1 and o1 < r0 for (o0, o1) in spans):
            sys.exit(f"FAIL: chunk {chunk}: writer {writer} seq {seq} read after a newer write completed")
    print(f"lincheck: {len(writes)} writes, {len(reads)} reads, all linearizable per chunk")
    if not writes or not reads:
        sys.exit("FAIL: nothing was written or nothing was read")


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "write":
        write(args[0], int(args[1]), int(args[2]), int(args[3]), int(args[4]), args[5])
    elif cmd == "read":
        read(args[0], int(args[1]), int(args[2]), args[3], int(args[4]), args[5])
    elif cmd == "check":
        check(args)
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()

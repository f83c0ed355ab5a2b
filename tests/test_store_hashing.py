"""The storage SCP's hashing thread: digests right and in order, and memory bounded."""

import hashlib
import os
import threading

from studies.store import HashingThread


def test_it_gives_each_instance_the_digest_of_its_own_bytes_in_order() -> None:
    hasher = HashingThread(max_backlog=1024 * 1024)
    chunks = {name: [os.urandom(100_000) for _ in range(12)] for name in ("a", "b", "c")}
    digests = {name: hashlib.sha256() for name in chunks}
    try:
        # Interleaved, as fragments of successive instances arrive.
        for index in range(12):
            for name in chunks:
                hasher.update(digests[name], memoryview(chunks[name][index]))
        results = {name: hasher.hexdigest(digest) for name, digest in digests.items()}
        for name, future in results.items():
            assert future.result(timeout=10) == hashlib.sha256(b"".join(chunks[name])).hexdigest()
    finally:
        hasher.close()


class _SlowDigest:
    """Hashes nothing until released: a hash far slower than the sender."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.updates = 0

    def update(self, data: bytes) -> None:
        self.release.wait(timeout=10)
        self.updates += 1

    def hexdigest(self) -> str:
        return f"{self.updates} updates"


def test_a_sender_faster_than_the_hash_waits_instead_of_filling_the_memory() -> None:
    hasher = HashingThread(max_backlog=300)
    digest = _SlowDigest()
    fed = []

    def sender() -> None:
        for index in range(10):
            hasher.update(digest, b"x" * 100)  # type: ignore[arg-type]
            fed.append(index)

    thread = threading.Thread(target=sender, daemon=True)
    try:
        thread.start()
        thread.join(timeout=0.5)
        # Three fragments fit in the backlog; the fourth waits for the hash to catch up.
        assert thread.is_alive()
        assert len(fed) == 3
        digest.release.set()
        thread.join(timeout=10)
        assert len(fed) == 10
        assert hasher.hexdigest(digest).result(timeout=10) == "10 updates"  # type: ignore[arg-type]
    finally:
        digest.release.set()
        hasher.close()

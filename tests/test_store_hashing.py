"""The storage SCP's hashing thread: digests right and in order, and memory bounded."""

import hashlib
import os
import threading

import pytest

from studies import dicom
from studies.demo import synthetic
from studies.store import HashingThread, Indexer


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


class _BrokenDigest:
    def update(self, data: bytes) -> None:
        raise MemoryError("no room to hash")

    def hexdigest(self) -> str:
        return "0" * 64


def test_an_error_while_hashing_is_not_recorded_as_a_digest() -> None:
    hasher = HashingThread()
    digest = _BrokenDigest()
    try:
        hasher.update(digest, b"x" * 4096)  # type: ignore[arg-type]
        with pytest.raises(MemoryError):
            hasher.hexdigest(digest).result(timeout=10)  # type: ignore[arg-type]
    finally:
        hasher.close()


class _CountingHasher(HashingThread):
    def __init__(self) -> None:
        super().__init__()
        self.handed_over: list[int] = []

    def update(self, digest: "hashlib._Hash", data: bytes | memoryview) -> None:
        self.handed_over.append(len(data))
        super().update(digest, data)


@pytest.mark.django_db
def test_tiny_fragments_are_gathered_before_they_are_hashed() -> None:
    ds = synthetic.make_study(
        patient_name="Tiny^Fragments", patient_id="TF", modalities=(("CT", 1),), rows=64, columns=64
    )[0]
    part10 = synthetic.to_bytes(ds)
    data = part10[dicom.dataset_offset(part10) :]
    hasher = _CountingHasher()
    try:
        incoming = Indexer().begin(
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            hasher=hasher,
        )
        # A hostile or odd sender: one byte per fragment, then empty ones.
        for offset in range(len(data)):
            incoming.write(data[offset : offset + 1])
        for _ in range(1000):
            incoming.write(b"")
        placed = incoming.place()
        assert placed.sha256.result(timeout=10) == hashlib.sha256(data).hexdigest()
    finally:
        hasher.close()
    assert sum(hasher.handed_over) == len(data)
    assert len(hasher.handed_over) <= len(data) // (64 * 1024) + 1

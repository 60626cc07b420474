"""Read back a W&B offline run (``<dir>/wandb/offline-run-*/run-<id>.wandb``) for the tests.

wandb 0.31 has no public reader for its run files (``wandb.sdk.internal.datastore.DataStore`` of earlier releases is
gone) and writes no ``config.yaml``/``wandb-summary.json`` offline, so this reads the file's framing directly: the
LevelDB log format (https://github.com/google/leveldb/blob/main/doc/log_format.md) with W&B's 7-byte header
``":W&B"``, magic ``0xBEE1``, version 0, as in wandb's former ``wandb/sdk/internal/datastore.py``: 32 KiB blocks of
chunks ``(crc32 uint32, length uint16, type uint8, data)`` (types FULL=1, FIRST=2, MIDDLE=3, LAST=4; the CRC is
zlib's crc32 of the data seeded with the crc32 of the type byte), a block's tail shorter than a chunk header is zero
padding. Each record is a ``wandb.proto.wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def offline_wandb(monkeypatch: Any, tmp: Path) -> Path:
    """Make W&B run offline with every directory it writes under ``tmp`` (``monkeypatch``: pytest's fixture);
    returns WANDB_DIR, under which :func:`read_run` finds the run."""
    for var, sub in (("WANDB_DIR", "wandb_dir"), ("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache")):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(var, str(tmp / sub))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp / "config"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp / "wandb_dir"


def records(path: Path) -> Iterator[Any]:
    """The protobuf records of a ``.wandb`` file, in order (checksums verified)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"not a W&B run file: {(ident, magic, version)}"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer
            pos += left
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:  # zero padding up to the end of the block
            pos += left
            continue
        if pos + HEADER + length > len(data):  # a record still being written
            return
        chunk = data[pos + HEADER : pos + HEADER + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == checksum, f"bad checksum at {pos}"
        pos += HEADER + length
        pending += chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class OfflineRun:
    """What an offline run recorded."""

    path: Path
    run_id: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    exit_code: int | None = None

    def history_keys(self) -> set[str]:
        return {k for row in self.history for k in row}


def read_run(wandb_dir: Path, timeout: float = 30.0) -> OfflineRun:
    """The single offline run under ``wandb_dir`` (the directory holding ``wandb/``), once its exit record is
    written: ``wandb.finish()`` can return before W&B's service process has flushed the file, so this polls."""
    found = sorted(Path(wandb_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert len(found) == 1, f"expected one offline run file under {wandb_dir}/wandb, found {found}"
    deadline = time.monotonic() + timeout
    run = _parse(found[0])
    while run.exit_code is None and time.monotonic() < deadline:
        time.sleep(0.1)
        run = _parse(found[0])
    return run


def _parse(path: Path) -> OfflineRun:
    run = OfflineRun(path)
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id = record.run.run_id
            run.config.update({_key(u): json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "config":
            run.config.update({_key(u): json.loads(u.value_json) for u in record.config.update})
        elif kind == "summary":
            run.summary.update({_key(u): json.loads(u.value_json) for u in record.summary.update})
        elif kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "files":
            run.files += [f.path for f in record.files.files]
        elif kind == "artifact":
            art = record.artifact
            paths = [entry.path for entry in art.manifest.contents]
            run.artifacts.append({"name": art.name, "type": art.type, "aliases": list(art.aliases), "paths": paths})
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run

"""DCP's index of a checkpoint's shards, `.metadata`, read without running it: torch's FileSystemReader
unpickles it with pickle.load, so a replaced `.metadata` would run whatever it says, as soon as anything
looks at the checkpoint (a --resume check, the run lock's check, the load). Here its bytes are first
checked against the checkpoint's checksum manifest (sha256.json), then unpickled by an unpickler that
builds only DCP's metadata classes, torch.Size, dtypes and layouts: a checkpoint directory is data, not code.
Imports torch only.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import StorageMeta

METADATA_FILE = ".metadata"
MANIFEST_FILE = "sha256.json"

# what torch 2.x's DCP writes into .metadata (the dataclasses of torch.distributed.checkpoint.metadata, the
# file system writer's _StorageInfo, the checkpoint id as a path), and nothing that runs code
_ALLOWED = {("torch.distributed.checkpoint.metadata", name) for name in (
    "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata", "ChunkStorageMetadata",
    "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}


class MetadataError(ValueError):
    """A .metadata not read: unverified, damaged, replaced or asking for code. The message names the file."""


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, name: str):
        super().__init__(file)
        self.name = name

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{self.name} asks for {module}.{name}, which a DCP index never holds: "
                                     "refused without running it (was the file replaced?)")


def verified_bytes(path: str) -> bytes:
    """The bytes of checkpoint `path`'s .metadata, once their sha256 matches sha256.json's: MetadataError,
    naming the file, if the manifest is missing or unreadable or the digest differs (nothing is unpickled)."""
    file, manifest = os.path.join(path, METADATA_FILE), os.path.join(path, MANIFEST_FILE)
    try:
        with open(manifest) as f:
            digest = json.load(f)[METADATA_FILE]
    except (OSError, ValueError, KeyError, TypeError) as e:
        what = "missing" if isinstance(e, FileNotFoundError) else f"unreadable or without {METADATA_FILE} ({e!r:.200})"
        raise MetadataError(f"{manifest} {what}: {file} is not read unverified") from None
    with open(file, "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != digest:
        raise MetadataError(f"{file} damaged or replaced (its sha256 differs from {MANIFEST_FILE}'s): not read")
    return data


def read(path: str):
    """Checkpoint `path`'s DCP Metadata: verified against the manifest, then unpickled restricted."""
    file = os.path.join(path, METADATA_FILE)
    data = verified_bytes(path)
    try:
        return _Unpickler(io.BytesIO(data), file).load()
    except pickle.UnpicklingError as e:
        raise MetadataError(str(e) if file in str(e) else f"{file} unreadable (UnpicklingError: {e})") from None
    except Exception as e:  # a truncated pickle, a class's checks
        raise MetadataError(f"{file} unreadable ({type(e).__name__}: {str(e)[:200]})") from None


class Reader(FileSystemReader):
    """torch's FileSystemReader, reading .metadata as `read` does (for dcp.load's storage_reader)."""

    def read_metadata(self, *args, **kwargs):
        metadata = read(str(self.path))
        if getattr(metadata, "storage_meta", None) is None:  # as FileSystemReader.read_metadata does
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

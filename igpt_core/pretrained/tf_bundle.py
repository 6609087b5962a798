"""TensorFlow's checkpoint files (the "tensor bundle" a TF1 `Saver` writes), read without TensorFlow.

A checkpoint `PREFIX` is

    PREFIX.index                      which tensors exist, and where each one's bytes lie
    PREFIX.data-00000-of-000NN ...    the tensors' bytes, one file per shard (NN shards)

The index is a LevelDB-style sorted table (TensorFlow's `lib/io/table`):

    data blocks ... | metaindex block | index block | footer (48 bytes)

- footer: the metaindex and index blocks' handles (offset, size as varints), zero padding to 40
  bytes, then the 8-byte magic number 0xdb4775248b80fb57;
- a block: entries, then the restart points (uint32 offsets), then their count (uint32), then a
  5-byte trailer: compression type (0 = none) and the masked crc32c of the block and that byte;
- an entry: varint shared-prefix length, varint rest-of-key length, varint value length, the rest
  of the key, the value (keys share a prefix with the previous key, except at restart points);
- the index block maps the last key of each data block to that block's handle.

The values are protobuf messages, parsed here by hand (only varint, 64-bit, length-delimited and
32-bit fields occur): under the key "" a BundleHeaderProto (1 num_shards, 2 endianness), under each
tensor's name a BundleEntryProto (1 dtype, 2 shape, 3 shard_id, 4 offset, 5 size, 6 crc32c, 7 slices).
A tensor is `size` bytes at `offset` in its shard, little-endian, C order; the entry's crc32c is
the *masked* CRC-32C of exactly those bytes (TensorFlow masks every stored CRC, see `masked_crc32c`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np

from ..errors import CheckpointError

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48  # two block handles of at most 20 bytes each, padded to 40, then the 8-byte magic
BLOCK_TRAILER_SIZE = 5  # compression type (1 byte) + masked crc32c (4 bytes)
CRC_MASK_DELTA = 0xA282EAD8

# TensorFlow's DataType enum (types.proto) -> numpy, for the types a checkpoint of weights holds.
DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8, 9: np.int64,
          10: np.bool_, 19: np.float16}


# -- encodings --------------------------------------------------------------------------------------


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """A little-endian base-128 varint at data[pos:]: (value, position after it)."""
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise CheckpointError("a varint runs past its end: the checkpoint index is damaged")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def masked_crc32c(data: bytes) -> int:
    """CRC-32C of data, masked as TensorFlow and LevelDB store it: rotated right by 15 bits, plus a
    constant (a CRC of bytes that themselves hold CRCs would otherwise be degenerate)."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + CRC_MASK_DELTA) & 0xFFFFFFFF


def parse_message(data: bytes) -> dict[int, list]:
    """A protobuf message's fields: {field number: [values]} (ints, or bytes for length-delimited fields)."""
    fields: dict[int, list] = {}
    pos = 0
    while pos < len(data):
        tag, pos = read_varint(data, pos)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            value, pos = read_varint(data, pos)
        elif wire_type == 1:
            value, pos = int.from_bytes(data[pos:pos + 8], "little"), pos + 8
        elif wire_type == 2:
            length, pos = read_varint(data, pos)
            value, pos = bytes(data[pos:pos + length]), pos + length
        elif wire_type == 5:
            value, pos = int.from_bytes(data[pos:pos + 4], "little"), pos + 4
        else:
            raise CheckpointError(f"protobuf wire type {wire_type} in the checkpoint index: it is damaged")
        if pos > len(data):
            raise CheckpointError("a protobuf field runs past its message: the checkpoint index is damaged")
        fields.setdefault(number, []).append(value)
    return fields


# -- the sorted table -------------------------------------------------------------------------------


def read_block(table: bytes, offset: int, size: int) -> bytes:
    """A block's contents at (offset, size), its trailer checked: uncompressed, crc32c right."""
    end = offset + size
    if end + BLOCK_TRAILER_SIZE > len(table):
        raise CheckpointError("a block of the checkpoint index lies past its end: the file is truncated")
    contents = table[offset:end]
    compression = table[end]
    stored_crc = int.from_bytes(table[end + 1:end + 5], "little")
    if masked_crc32c(table[offset:end + 1]) != stored_crc:
        raise CheckpointError("a block of the checkpoint index fails its crc32c check: the file is damaged")
    if compression != 0:
        raise CheckpointError(f"the checkpoint index uses compression type {compression}; only uncompressed "
                              "indexes (what TensorFlow writes) are supported")
    return contents


def block_entries(block: bytes) -> list[tuple[bytes, bytes]]:
    """The (key, value) pairs of one block, in order, keys rebuilt from their shared prefixes."""
    if len(block) < 4:
        raise CheckpointError("a block of the checkpoint index is too short: the file is damaged")
    n_restarts = int.from_bytes(block[-4:], "little")
    entries_end = len(block) - 4 - 4 * n_restarts
    if entries_end < 0:
        raise CheckpointError("a block of the checkpoint index has a bad restart count: the file is damaged")
    entries, key, pos = [], b"", 0
    while pos < entries_end:
        shared, pos = read_varint(block, pos)
        unshared, pos = read_varint(block, pos)
        value_length, pos = read_varint(block, pos)
        if shared > len(key) or pos + unshared + value_length > entries_end:
            raise CheckpointError("an entry of the checkpoint index runs past its block: the file is damaged")
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        entries.append((key, block[pos:pos + value_length]))
        pos += value_length
    return entries


def read_table(table: bytes) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of a sorted-table file's contents, in key order."""
    if len(table) < FOOTER_SIZE or int.from_bytes(table[-8:], "little") != TABLE_MAGIC:
        raise CheckpointError("not a TensorFlow checkpoint index (no table footer): the file is truncated or "
                              "of another kind")
    footer = table[-FOOTER_SIZE:]
    _, pos = read_varint(footer, read_varint(footer, 0)[1])  # skip the metaindex handle: TF leaves it empty
    index_offset, pos = read_varint(footer, pos)
    index_size, _ = read_varint(footer, pos)
    entries = []
    for _, handle in block_entries(read_block(table, index_offset, index_size)):
        offset, pos = read_varint(handle, 0)
        size, _ = read_varint(handle, pos)
        entries.extend(block_entries(read_block(table, offset, size)))
    return entries


# -- the bundle -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie, and what they are."""

    name: str
    dtype: type
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc32c: int  # masked, as stored


def parse_entry(name: str, value: bytes) -> TensorEntry | None:
    """A BundleEntryProto; None for a tensor of a type weights never have (strings)."""
    fields = parse_message(value)
    if 7 in fields:
        raise CheckpointError(f"tensor {name!r} is saved in slices (a partitioned variable); igpt reads whole "
                              "tensors only")
    dtype = DTYPES.get(fields.get(1, [0])[0])
    if dtype is None:
        return None
    shape = ()
    for shape_field in fields.get(2, []):
        dims = [parse_message(dim).get(1, [0])[0] for dim in parse_message(shape_field).get(2, [])]
        shape = tuple(dims)
    return TensorEntry(name, dtype, shape, fields.get(3, [0])[0], fields.get(4, [0])[0], fields.get(5, [0])[0],
                       fields.get(6, [0])[0])


class TensorBundle:
    """A TensorFlow checkpoint `prefix` (e.g. folder/model.ckpt-131000): its index read at once, each
    tensor read from its shard only when asked for (so optimizer slots are never loaded)."""

    def __init__(self, prefix: str | Path):
        self.prefix = Path(prefix)
        index = self.prefix.with_name(self.prefix.name + ".index")
        if not index.is_file():
            raise CheckpointError(f"{index} is missing; a TensorFlow checkpoint is PREFIX.index plus PREFIX.data-* files")
        entries = read_table(index.read_bytes())
        if not entries or entries[0][0] != b"":
            raise CheckpointError(f"{index} has no bundle header: it is not a TensorFlow checkpoint index")
        header = parse_message(entries[0][1])
        self.num_shards = header.get(1, [1])[0]
        if header.get(2, [0])[0] != 0:  # BundleHeaderProto.Endianness: 0 = little, 1 = big
            raise CheckpointError(f"{index} was written on a big-endian machine; igpt reads little-endian checkpoints")
        self.entries: dict[str, TensorEntry] = {}
        for key, value in entries[1:]:
            entry = parse_entry(key.decode("utf-8", "replace"), value)
            if entry is not None:
                self.entries[entry.name] = entry
        bad = [e for e in self.entries.values()
               if not 0 <= e.shard < self.num_shards or e.size != int(np.prod(e.shape)) * np.dtype(e.dtype).itemsize]
        if bad:
            raise CheckpointError(f"{index} describes tensor {bad[0].name!r} inconsistently (shard or size): "
                                  "the index is damaged")

    def shard_path(self, shard: int) -> Path:
        return self.prefix.with_name(f"{self.prefix.name}.data-{shard:05d}-of-{self.num_shards:05d}")

    def check_shards(self) -> None:
        """Every shard is there with exactly the bytes the index accounts for (TF writes tensors back to
        back), so a truncated or foreign shard, or an index of another checkpoint, is caught up front."""
        ends = [0] * self.num_shards
        for entry in self.entries.values():
            ends[entry.shard] = max(ends[entry.shard], entry.offset + entry.size)
        for shard, end in enumerate(ends):
            path = self.shard_path(shard)
            if not path.is_file():
                raise CheckpointError(f"{path.name} is missing from {path.parent}: the checkpoint has "
                                      f"{self.num_shards} shards; download or copy it again")
            size = path.stat().st_size
            if size != end:
                raise CheckpointError(f"{path.name} has {size} bytes but its index accounts for {end}: the shard is "
                                      f"{'truncated' if size < end else 'of another checkpoint'}, or the index "
                                      "belongs to another checkpoint; download or copy them again")

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entry(name).shape

    def entry(self, name: str) -> TensorEntry:
        if name not in self.entries:
            raise CheckpointError(f"{self.prefix.name} has no tensor {name!r}: it is not an iGPT checkpoint of "
                                  "OpenAI's layout, or it is incomplete")
        return self.entries[name]

    def read(self, name: str) -> np.ndarray:
        """One tensor as a numpy array, its bytes checked against the index's crc32c."""
        entry = self.entry(name)
        path = self.shard_path(entry.shard)
        with open(path, "rb") as f:
            f.seek(entry.offset)
            data = f.read(entry.size)
        if len(data) != entry.size:
            raise CheckpointError(f"{path.name} ends inside tensor {name!r}: the shard is truncated; download it again")
        if masked_crc32c(data) != entry.crc32c:
            raise CheckpointError(f"tensor {name!r} in {path.name} fails its crc32c check: the shard is corrupted, "
                                  "or the index belongs to another checkpoint; download it again")
        return np.frombuffer(data, dtype=np.dtype(entry.dtype).newbyteorder("<")).reshape(entry.shape)


__all__ = ["TensorBundle", "TensorEntry", "masked_crc32c", "parse_message", "read_table", "read_varint"]

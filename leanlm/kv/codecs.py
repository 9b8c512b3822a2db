"""KVCodec: how K and V are stored in the paged cache's slots.

The paged cache owns the block bookkeeping (which slots a sequence uses); a codec owns the bytes.
A compressed codec (quantized, block floating point, XQuant) implements the same three calls and
returns K/V dequantized to the compute dtype, so attention never knows the storage format.
"""
from __future__ import annotations

import torch

from leanlm.native import ops as native_ops


class KVCodec:
    """Storage of K/V for `num_slots` token slots of every layer (slot = block * block_size + offset)."""

    spec: str = "plain"  # goes into the prefix-cache hash: caches of different codecs never mix
    exact: bool = False  # reads return exactly what was written: a chunk may attend to its own k/v
    rotation: torch.Tensor | None = None  # [D, D] orthonormal: q, k, v enter the cache times it (kivi rotate)
    rotate_qk: bool = True    # the rotation applies to q and k too (not with pre-RoPE keys: v only)
    rope_keys: bool = False   # keys are written before RoPE; reads return them rotated (xquant)
    wants_layer_input: bool = False  # write() also takes x, the layer's residual-stream input (xquant:cl)
    cross_layer: bool = False  # a layer's storage depends on the previous layer's in the same step
    blockwise: bool = False    # quantizes a block when its last slot is written (KIVI)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [T, Hkv, D] of T new tokens into `slots` [T] (int64)."""
        raise NotImplementedError

    def read_blocks(self, layer: int, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of whole blocks: block_tables [B, nblk] -> [B, nblk * block_size, Hkv, D]."""
        raise NotImplementedError

    def read_slots(self, layer: int, first_slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of `length` consecutive slots (a sequence whose blocks are physically adjacent):
        [length, Hkv, D]; a plain codec returns views, no copy."""
        raise NotImplementedError

    def bytes_per_token(self) -> int | float:
        """Bytes of storage per cached token, all layers, K and V, scales included."""
        raise NotImplementedError

    def fixed_bytes(self) -> int:
        """Bytes that do not grow with the slots (e.g. a full-precision residual pool)."""
        return 0

    def allocated_bytes(self) -> int:
        """Bytes of every tensor the codec holds: num_slots * bytes_per_token() + fixed_bytes()."""
        return sum(t.untyped_storage().nbytes() for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def release(self, blocks: list[int]) -> None:
        """The blocks of a sequence are being freed (a codec with per-block state drops it). The
        list may be the sequence's table itself, whose EVICTED (-1) entries (kv stream) name no
        block: they were released when evicted."""

    def plan_step(self, seqs, slots: torch.Tensor) -> None:
        """Called once per step with the step's sequence slices and slot mapping, before any
        write: a codec whose storage depends on where a block sits in its sequence (kivi's rR
        window, sinkS) plans the step here."""

    fused_decode: bool = False  # decode_attention may compute attention on the stored form

    def decode_attention(self, layer: int, q: torch.Tensor, block_tables: torch.Tensor,
                         lens: torch.Tensor) -> torch.Tensor | None:
        """One query per sequence, q [B, Hq, D], attending to its blocks (block_tables [B, nblk],
        lens [B] tokens each) straight from the stored form -> [B, Hq, D]; None: the cache reads
        the blocks (read_blocks / read_slots) and runs SDPA instead."""
        return None


class PlainCodec(KVCodec):
    """K/V kept in a float dtype (default: the model's): one [num_slots, Hkv, D] tensor per layer
    for K and for V, read back in the compute dtype `dtype`."""

    def __init__(self, num_layers: int, num_slots: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device,
                 storage_dtype: torch.dtype | None = None, spec: str = "plain"):
        self.block_size, self.num_kv_heads, self.head_dim = block_size, num_kv_heads, head_dim
        self.dtype, self.num_layers, self.spec = dtype, num_layers, spec
        storage = storage_dtype or dtype
        self.exact = storage == dtype or storage.itemsize > dtype.itemsize and storage == torch.float32
        # zeros, not empty: masked-out slots still enter attention's matmul with weight 0, and
        # 0 * NaN (uninitialised memory) would poison the output
        shape = (num_slots, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=storage, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=storage, device=device) for _ in range(num_layers)]
        # float32 compute on the CPU over float32 or bfloat16 pages: attention straight from the
        # pages (leanlm/native/ops.c), no gather, transposes or SDPA setup per layer
        self.fused_decode = ((storage == torch.float32 or storage == torch.bfloat16 and head_dim <= 256)
                             and dtype == torch.float32 and torch.device(device).type == "cpu"
                             and native_ops.available())

    def tensors(self) -> list[torch.Tensor]:
        return self.k + self.v

    def write(self, layer, slots, k, v) -> None:
        self.k[layer].index_copy_(0, slots, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(0, slots, v.to(self.v[layer].dtype))

    def read_blocks(self, layer, block_tables):
        B, nblk = block_tables.shape
        rows = block_tables.reshape(-1)
        # whole blocks as rows of one 2-D view: index_select copies contiguous rows (~1.4x faster
        # than advanced indexing of the 4-D view at batch 64)
        per_block = self.block_size * self.num_kv_heads * self.head_dim
        k = torch.index_select(self.k[layer].view(-1, per_block), 0, rows)
        v = torch.index_select(self.v[layer].view(-1, per_block), 0, rows)
        out = (B, nblk * self.block_size, self.num_kv_heads, self.head_dim)
        return k.view(out).to(self.dtype), v.view(out).to(self.dtype)  # .to: no copy when same dtype

    def decode_attention(self, layer, q, block_tables, lens):
        if torch.compiler.is_compiling():
            return None
        return native_ops.paged_attention(q, self.k[layer], self.v[layer], block_tables, lens,
                                          self.block_size)

    def read_slots(self, layer, first_slot, length):
        end = first_slot + length
        return self.k[layer][first_slot:end].to(self.dtype), self.v[layer][first_slot:end].to(self.dtype)

    def bytes_per_token(self) -> int:
        return self.bytes_per_token_for(self.num_layers, self.num_kv_heads, self.head_dim, self.k[0].dtype)

    @staticmethod
    def bytes_per_token_for(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * dtype.itemsize

"""Static configuration of a paged KV cache, and the pool layout, defined once.

Vocabulary used across the package (code, shape comments, docstrings, errors, README); one word
per concept:

* ``layers``: transformer layers (``num_layers``).
* ``kv_heads`` / ``q_heads``: key/value heads and query heads.
* ``head_dim``: size of one head.
* ``num_blocks``: physical blocks in the *pool*, including the reserved null block 0. Never a
  table's width.
* ``block_size``: tokens per block.
* *slot* (alone) / *sequence slot*: one of ``max_seqs`` places a sequence can live; its id, a
  ``seq_id`` in ``[0, max_seqs)``, is how every op names the sequence (``InvalidSlotError``,
  ``SlotInUseError``, ... are about these).
* *token slot*: one physical place for one token's K/V, the flat index
  ``block * block_size + offset`` into a pool (what :func:`~jax_paged_kv.reserve` returns and
  :func:`~jax_paged_kv.write_kv` takes; ``InvalidTokenSlotError``). Always said in full.
* ``table_width``: block-table columns, ``ceil(max_seq_len / block_size)``
  (:attr:`CacheConfig.table_width`; ``max_blocks_per_seq`` is the same number).
* ``max_blocks``: the block-table columns *one call reads* (``<= table_width``), a static hint
  of the attention paths, the models and the engine's buckets.
* ``batch``: rows of one call; ``seq_ids[batch]`` says which sequence each row targets and a
  negative id marks a padding row that is ignored.
* ``T`` / ``q_len``: new tokens (or queries) per row in one call.

Pool layout (the one place it is defined): ``[layers, kv_heads, num_blocks, block_size, head_dim]``
for keys and for values ("HND" per layer, like JAX's own GPU/TPU paged-attention kernels). One
block of one head is a contiguous ``[block_size, head_dim]`` tile, which is what both the Pallas
GPU kernel (a strided block load per page) and the TPU kernel (one DMA per page) want.

Sentinel: block 0 is the *null block*. It is never allocated, every unused block-table entry
points at it, and nothing is ever written to it (padding writes use out-of-range indices with
``mode="drop"``). Reads of it are always masked, so its content (even NaN) never matters. This
avoids JAX's clamping of out-of-range gathers and the wrap-around of ``-1``.
"""

from __future__ import annotations

import dataclasses
import enum
import math

import jax
import jax.numpy as jnp
import numpy as np

from jax_paged_kv.cache import quant

NULL_BLOCK = 0


class CacheStrategy(enum.Enum):
  """How sequences get memory.

  * ``PAGED``: blocks are handed out on demand from a shared free list (vLLM's PagedAttention).
  * ``CONTIGUOUS``: every slot owns a fixed slab of ``max_blocks`` blocks reserved up front (the
    classic "continuous" KV cache), behind the same API; useful as a baseline at equal memory.
  """

  PAGED = "paged"
  CONTIGUOUS = "contiguous"


def pool_shape(
    num_layers: int, num_kv_heads: int, num_blocks: int, block_size: int, head_dim: int
) -> tuple[int, int, int, int, int]:
  """The pool layout: ``[layers, kv_heads, num_blocks, block_size, head_dim]``."""
  return (num_layers, num_kv_heads, num_blocks, block_size, head_dim)


@dataclasses.dataclass(frozen=True)
class CacheConfig:
  """Static, hashable description of a paged KV cache.

  Attributes:
    num_layers: transformer layers stored in the pools.
    num_kv_heads: key/value heads per layer.
    head_dim: size of one head.
    num_blocks: physical blocks per pool, *including* the reserved null block 0, so
      ``num_blocks - 1`` blocks can hold data. For ``CONTIGUOUS`` it must be at least
      ``1 + max_seqs * max_blocks``.
    max_seqs: number of sequence slots.
    max_seq_len: longest sequence a slot may hold, in tokens.
    block_size: tokens per block (default 16).
    dtype: storage dtype of the pools (e.g. ``jnp.bfloat16``).
    strategy: ``CacheStrategy.PAGED`` (default) or ``CacheStrategy.CONTIGUOUS``.
    kv_quant: ``None`` (store K/V in ``dtype``), ``"int8"``, ``"fp8"`` or ``"int4"``: store
      them quantised with scales beside the pools (see :mod:`jax_paged_kv.cache.quant`). K/V
      are still written and read in ``dtype``.
    pool_bits: store an unquantised 16-bit ``dtype`` (bfloat16, float16) as its uint16 bit
      patterns; every write and read converts (a free bitcast), so values are unchanged. XLA:CPU
      lowers a scatter into a bfloat16 buffer through float32 and rewrites the whole pool on
      every append (O(pool), measured 60-470x slower at 64k than at 1k blocks); a uint16
      scatter stays in place (O(tokens written)). ``None`` (default): on when ``dtype`` is 16
      bits, ``kv_quant`` is None and JAX's default backend is CPU; off elsewhere (GPU and TPU
      scatter 16-bit floats in place).
  """

  num_layers: int
  num_kv_heads: int
  head_dim: int
  num_blocks: int
  max_seqs: int
  max_seq_len: int
  block_size: int = 16
  dtype: jnp.dtype = jnp.float32
  strategy: CacheStrategy = CacheStrategy.PAGED
  kv_quant: str | None = None
  pool_bits: bool | None = None

  def __post_init__(self):
    quant.check_format(self.kv_quant)
    for name in ("num_layers", "num_kv_heads", "head_dim", "num_blocks", "max_seqs",
                 "max_seq_len", "block_size"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"CacheConfig.{name} must be an int, got {value!r}")
      if value < 1:
        raise ValueError(f"CacheConfig.{name} must be >= 1, got {name}={value}")
      object.__setattr__(self, name, int(value))
    # After the conversion: a NumPy integer head_dim gets the same check as an int.
    if self.kv_quant == "int4" and (
        self.head_dim % 2 or self.head_dim % quant.int4_group(self.head_dim)):
      raise ValueError(f"kv_quant='int4' needs an even head_dim that is a multiple of "
                       f"{quant.INT4_GROUP} (or below it), got head_dim={self.head_dim}")
    # Positions and token slots are int32 on device, and num_blocks * block_size is the
    # "no token" slot: every one of them must fit, or a sum wraps.
    top = np.iinfo(np.int32).max
    for what, value in (("num_blocks * block_size", self.num_blocks * self.block_size),
                        ("max_seq_len rounded up to a block",
                         -(-self.max_seq_len // self.block_size) * self.block_size)):
      if value > top:
        raise ValueError(f"CacheConfig: {what} = {value} does not fit in int32 (<= {top})")
    try:
      dtype = jnp.dtype(self.dtype)
    except TypeError as e:
      raise ValueError(f"CacheConfig.dtype is not a dtype: {self.dtype!r}") from e
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"CacheConfig.dtype must be a floating dtype, got {dtype}")
    object.__setattr__(self, "dtype", dtype)
    sixteen = jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize == 2
    if self.pool_bits is None:
      object.__setattr__(self, "pool_bits", bool(
          sixteen and self.kv_quant is None and jax.default_backend() == "cpu"))
    elif self.pool_bits and not (sixteen and self.kv_quant is None):
      raise ValueError(f"pool_bits=True needs an unquantised 16-bit dtype, got {dtype} with "
                       f"kv_quant={self.kv_quant!r}")
    object.__setattr__(self, "pool_bits", bool(self.pool_bits))
    if not isinstance(self.strategy, CacheStrategy):
      try:
        object.__setattr__(self, "strategy", CacheStrategy(self.strategy))
      except ValueError as e:
        raise ValueError(f"CacheConfig.strategy must be a CacheStrategy, got "
                         f"{self.strategy!r}") from e
    if self.num_blocks < 2:
      raise ValueError(f"{self.num_blocks=} must be >= 2 (block 0 is the reserved null block)")
    if self.num_blocks >= 2**31 // self.block_size:
      raise ValueError(f"{self.num_blocks=} x {self.block_size=} overflows int32 slot indices")
    if (self.strategy is CacheStrategy.CONTIGUOUS
        and self.num_blocks < 1 + self.max_seqs * self.max_blocks_per_seq):
      raise ValueError(
          f"CONTIGUOUS needs num_blocks >= 1 + max_seqs * max_blocks_per_seq = "
          f"{1 + self.max_seqs * self.max_blocks_per_seq}, got {self.num_blocks=}")

  # ---- derived sizes -------------------------------------------------------------------------

  @property
  def max_blocks_per_seq(self) -> int:
    """Block-table width: ``ceil(max_seq_len / block_size)``."""
    return math.ceil(self.max_seq_len / self.block_size)

  @property
  def table_width(self) -> int:
    """Block-table columns, ``ceil(max_seq_len / block_size)`` (= ``max_blocks_per_seq``)."""
    return self.max_blocks_per_seq

  @property
  def usable_blocks(self) -> int:
    """Blocks that can hold data (all but the null block)."""
    return self.num_blocks - 1

  @property
  def storage_dtype(self) -> jnp.dtype:
    """Element dtype of the pools: ``dtype``, the quantised format's, or uint16 (``pool_bits``)."""
    if self.pool_bits:
      return jnp.dtype(jnp.uint16)
    return self.dtype if self.kv_quant is None else quant.storage_dtype(self.kv_quant)

  @property
  def kernel_dtype(self) -> jnp.dtype:
    """Element dtype of the pools as attention reads them (``pool_bits`` pools as ``dtype``)."""
    return self.dtype if self.pool_bits else self.storage_dtype

  @property
  def bytes_per_token(self) -> int | float:
    """Stored K and V bytes of one token over all layers and heads (scales included).

    An int when it is whole; int4's per-block K scales can make it a fraction.
    """
    b = self.block_bytes
    return b // self.block_size if b % self.block_size == 0 else b / self.block_size

  @property
  def block_bytes(self) -> int:
    """Stored K and V bytes of one block over all layers and heads (scales included)."""
    per_block = 2 * self.block_size * self.stored_head_dim * self.storage_dtype.itemsize
    if self.kv_quant is not None:
      k_shape, v_shape = quant.scale_shapes(self.kv_quant, self.pool_shape)
      k_dtype, v_dtype = quant.scale_dtypes(self.kv_quant)
      per_block += (math.prod(k_shape[3:]) * k_dtype.itemsize
                    + math.prod(v_shape[3:]) * v_dtype.itemsize)
    return self.num_layers * self.num_kv_heads * per_block

  @property
  def pool_bytes(self) -> int:
    """Bytes of both pools (K and V), null block included."""
    return self.block_bytes * self.num_blocks

  @property
  def pool_shape(self) -> tuple[int, int, int, int, int]:
    """``[layers, kv_heads, num_blocks, block_size, head_dim]``."""
    return pool_shape(self.num_layers, self.num_kv_heads, self.num_blocks, self.block_size,
                      self.head_dim)

  @property
  def stored_head_dim(self) -> int:
    """Elements per (token, KV head) in the pools: ``head_dim`` (int4: ``head_dim / 2``)."""
    return quant.stored_head_dim(self.kv_quant, self.head_dim)

  @property
  def stored_pool_shape(self) -> tuple[int, int, int, int, int]:
    """The pools' array shape: :attr:`pool_shape` with :attr:`stored_head_dim`."""
    return (*self.pool_shape[:4], self.stored_head_dim)

  @property
  def k_scale_shape(self) -> tuple[int, ...]:
    """``k_scale``'s shape: ``[layers, kv_heads, num_blocks, block_size]`` (a scale per token
    and head) for fp8; ``[layers, kv_heads, num_blocks, head_dim]`` (per block and channel)
    for int8 and int4."""
    return quant.scale_shapes(self.kv_quant, self.pool_shape)[0]

  @property
  def v_scale_shape(self) -> tuple[int, ...]:
    """``v_scale``'s shape: ``[layers, kv_heads, num_blocks, block_size]`` for int8 / fp8;
    ``[layers, kv_heads, num_blocks, block_size, head_dim / 32]`` (per token and group of 32
    channels) for int4."""
    return quant.scale_shapes(self.kv_quant, self.pool_shape)[1]

  def contiguous_block(self, slot, j):
    """The block a ``CONTIGUOUS`` cache gives entry ``j`` of ``slot`` (ints or arrays)."""
    return 1 + slot * self.max_blocks_per_seq + j

  # ---- constructors --------------------------------------------------------------------------

  @classmethod
  def from_memory_budget(
      cls,
      budget_bytes: int,
      *,
      num_layers: int,
      num_kv_heads: int,
      head_dim: int,
      max_seq_len: int,
      max_seqs: int | None = None,
      block_size: int = 16,
      dtype=jnp.float32,
      strategy: CacheStrategy = CacheStrategy.PAGED,
      kv_quant: str | None = None,
  ) -> CacheConfig:
    """Sizes the pools to fit ``budget_bytes`` (K and V together, null block included).

    For ``PAGED`` the pool gets ``floor(budget / block_bytes)`` blocks and ``max_seqs`` defaults
    to as many slots as could each hold one block. For ``CONTIGUOUS`` every slot needs a whole
    ``max_seq_len`` slab, so ``max_seqs`` is derived from the budget (an explicit ``max_seqs``
    larger than fits raises). With ``kv_quant`` a block holds fewer bytes (scales included),
    so the same budget buys more blocks.

    Raises:
      ValueError: the budget cannot hold the null block plus one usable block (or one slab).
    """
    probe = cls(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                num_blocks=2, max_seqs=1, max_seq_len=max_seq_len, block_size=block_size,
                dtype=dtype, kv_quant=kv_quant)
    num_blocks = int(budget_bytes) // probe.block_bytes
    if num_blocks < 2:
      raise ValueError(
          f"{budget_bytes=} holds {num_blocks} block(s) of {probe.block_bytes} bytes; "
          "need at least 2 (the null block plus one)")
    strategy = CacheStrategy(strategy)
    if strategy is CacheStrategy.CONTIGUOUS:
      fit = (num_blocks - 1) // probe.max_blocks_per_seq
      if fit < 1:
        raise ValueError(f"{budget_bytes=} cannot hold one contiguous slab of "
                         f"{probe.max_blocks_per_seq} blocks")
      if max_seqs is None:
        max_seqs = fit
      elif max_seqs > fit:
        raise ValueError(f"{max_seqs=} contiguous slabs do not fit in {budget_bytes=} "
                         f"(at most {fit})")
      num_blocks = 1 + max_seqs * probe.max_blocks_per_seq
    elif max_seqs is None:
      max_seqs = num_blocks - 1
    return cls(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
               num_blocks=num_blocks, max_seqs=max_seqs, max_seq_len=max_seq_len,
               block_size=block_size, dtype=dtype, strategy=strategy, kv_quant=kv_quant)

"""``implementation="pallas_mosaic_gpu"``: the cross-entropy kernels on Pallas's Mosaic GPU backend
(Hopper: TMA loads into swizzled shared memory, a pipelined class loop, one warpgroup per block
of 64 rows), the backend JAX keeps as it deprecates Pallas Triton.

* forward: a grid of row blocks (``plgpu.kernel``; or ``programs=P`` persistent programs, each
  walking the blocks ``p, p + P, ...``); each walks its rows' class axis in
  ``[64, block_c]`` tiles through ``plgpu.emit_pipeline`` (``max_concurrent_steps`` TMA copies in
  flight), keeping the online statistics ``(m, z, its compensation, a, b, sum_x)`` per row in
  registers (the WGMMA row layout), and writes the raw statistics of
  :func:`rowmath.loss_from_stats`, which finishes the loss in XLA (the ``[R]`` vectors only). For
  integer labels the sum leaves out the label's term (:func:`rowmath.label_log_z`: exact on
  confident rows); the sum is compensated (TwoSum, :func:`rowmath.add_rescaled`).
* backward: the same grid and walk; writes ``dlogits = g * (coef * softmax - target)`` tile by
  tile (``softmax = exp(x - m) / z``, shift invariant) with the label's exact entry
  (:func:`rowmath.label_grad`), from per-row scalars formed in XLA; dense labels also write
  ``dlabels``.

Shapes: TMA tiles want the rows in blocks of 64 and the classes in multiples of 64; other
shapes are padded to them in XLA first (one copy of the logits; the LLM shapes, e.g. 8192 x
128256, need none). Options: label smoothing, z-loss, soft-cap, ignore_index, ``class_weight``
(a ``[block_c]`` TMA copy per tile, read only where the walk needs it) and ``axis_name`` (vocab
parallel: the shards' raw statistics are merged in XLA). :func:`jxent.token_log_probs` has its
own walks (``logprob_stats``, ``logprob_grad``). value_and_grad of a scalar loss (``fused``) is the
statistics walk and the gradient walk: two launches, two reads of the logits, as the Triton
kernel's fused form, with the row scalars in XLA between them.

Tested in Mosaic GPU interpret mode on CPU (the shared kernel base, the accuracy contract,
vocab parallel over 8 simulated devices) and lowered for CUDA under an abstract H200
(tests/test_lowering.py); not yet compiled or timed on a GPU, so it is not the GPU default
(``implementation=None`` keeps ``pallas_triton`` until a GPU run shows it at least as fast:
``benchmarks/gpu_run.py`` checks, times and autotunes it beside Triton).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jxent._src.kernels import rowmath
from jxent._src.options import XentOptions

ROWS = 64  # rows per block: one warpgroup's WGMMA row layout
TILE = 64  # class alignment of a TMA tile (the 128-byte swizzle of 16-bit data; f32 needs 32)
# A TMA copy moves at most 256 elements along a dimension (the class weights' [block_c] copy), and
# a [64, 256] float32 tile is already 128 registers per thread of the warpgroup.
MAX_BLOCK_C = 256
SMEM_BUDGET = 192 * 1024  # bytes of tiles per block (Hopper has 227 KiB; the rest: rows, barriers)
_NEG = float(jnp.finfo(jnp.float32).min)


def _plgpu():
  from jax.experimental.pallas import mosaic_gpu as plgpu
  return plgpu


def _interpret_params():
  """Mosaic GPU interpret mode's parameters (simulated shared memory, TMA and barriers)."""
  try:
    from jax.experimental.pallas.mosaic_gpu import InterpretParams  # newer jax
  except ImportError:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as InterpretParams
  return InterpretParams()


@functools.lru_cache(maxsize=None)
def _load_takes_ref_alone() -> bool:
  """Whether ``plgpu.load`` takes the ref without an index (jax >= 0.11, where passing one is
  deprecated)."""
  import inspect
  idx = inspect.signature(_plgpu().load).parameters.get("idx")
  return idx is None or idx.default is not inspect.Parameter.empty


def _first_line(e: BaseException) -> str:
  return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"


@functools.lru_cache(maxsize=None)
def unavailable(abstract_device=None, *, interpret: bool = False) -> Optional[str]:
  """None where this jax can build the Mosaic GPU kernels; else the reason, in words: the
  backend imports, its interpret mode exists (``interpret``), or a small kernel lowers for CUDA
  (for ``abstract_device`` where one is set, lowering from a CPU host). Cached."""
  try:
    _plgpu()
    if interpret:
      _interpret_params()
  except Exception as e:  # noqa: BLE001  (any failure to import is the answer)
    return f"jax {jax.__version__} has no Pallas Mosaic GPU {'interpret mode' if interpret else 'backend'} ({_first_line(e)})"
  if interpret:
    return None
  try:
    mesh = contextlib.nullcontext()
    if abstract_device is not None:
      mesh = jax.sharding.use_abstract_mesh(
          jax.sharding.AbstractMesh((), (), abstract_device=abstract_device))
    kernel = PallasMosaicGpuKernel()
    x = jax.ShapeDtypeStruct((ROWS, TILE), jnp.float32)
    y = jax.ShapeDtypeStruct((ROWS,), jnp.int32)
    fn = lambda x, y: kernel._stats(x, y, sparse=True, opts=XentOptions(), c=TILE)  # noqa: E731
    with mesh:
      jax.jit(fn).trace(x, y).lower(lowering_platforms=("cuda",))
  except Exception as e:  # noqa: BLE001  (any failure to lower is the answer)
    return f"a Pallas Mosaic GPU kernel does not lower for CUDA with jax {jax.__version__} ({_first_line(e)})"
  return None


class _Layout:
  """Loads, iotas and layouts of the compiled kernel (WGMMA register layouts), or their plain
  forms in interpret mode (which simulates the memory, not the register layouts)."""

  def __init__(self, interpret: bool):
    self.interpret = interpret

  def load(self, ref, kind):
    """A pipelined block: ``"tile"`` ``[64, block_c]``, ``"row"`` ``[64]`` (one value per row)
    or ``"col"`` ``[block_c]`` (one value per class)."""
    if self.interpret:
      return ref[...]
    plgpu = _plgpu()
    layout = {"tile": plgpu.Layout.WGMMA, "row": plgpu.Layout.WGMMA.reduce(1),
              "col": plgpu.Layout.WGMMA.reduce(0)}[kind]
    # (jax 0.10 asks for the index; 0.11 deprecates passing it: the whole ref, indexed or not)
    return plgpu.load(ref, *(() if _load_takes_ref_alone() else ((),)), layout=layout)

  def cols(self, start, shape):
    if self.interpret:
      return start + lax.broadcasted_iota(jnp.int32, shape, 1)
    plgpu = _plgpu()
    return start + plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)

  def row_vector(self, value):
    v = jnp.full((ROWS,), value, jnp.float32)
    if self.interpret:
      return v
    plgpu = _plgpu()
    return plgpu.layout_cast(v, plgpu.Layout.WGMMA.reduce(1))

  def transforms(self, dtype, block_c):
    """The swizzled tiling of a ``[64, block_c]`` shared-memory tile (compiled kernels)."""
    if self.interpret:
      return ()
    plgpu = _plgpu()
    swizzle = plgpu.find_swizzle(block_c * jnp.dtype(dtype).itemsize * 8)
    elems = swizzle * 8 // (jnp.dtype(dtype).itemsize * 8)
    return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle))


def _bcast(v, shape):
  """A per-row vector ``[64]`` broadcast along the classes of a tile."""
  return lax.broadcast_in_dim(v, shape, [0])


def _bcast_col(v, shape):
  """A per-class vector ``[block_c]`` broadcast along the rows of a tile."""
  return lax.broadcast_in_dim(v, shape, [1])


def _specs(ins, kinds, i, block_c, lay):
  plgpu = _plgpu()
  spec = {
      "tile": lambda ref: plgpu.BlockSpec((ROWS, block_c), lambda j: (i, j),
                                          transforms=lay.transforms(ref.dtype, block_c)),
      "row": lambda ref: plgpu.BlockSpec((ROWS,), lambda j: (i,)),
      "col": lambda ref: plgpu.BlockSpec((block_c,), lambda j: (j,)),
  }
  return [spec[k](ref) for ref, k in zip(ins, kinds)]


# ------------------------------------------------------------------------------------------------
# The two kernel shapes: a statistics walk (per-row outputs) and a tile writer ([R, C] outputs).
# ------------------------------------------------------------------------------------------------
def _row_blocks(one, blocks, programs):
  """Runs ``one(i)`` for this program's blocks of 64 rows: block ``i = program`` (a grid of one
  program per block), or with ``programs = P`` (a persistent launch of P programs) the blocks
  ``program, program + P, ...`` in turn."""
  pid = lax.axis_index("rows")
  if programs is None:
    one(pid)
    return

  def step(k, carry):
    i = pid + k * programs

    @pl.when(i < blocks)
    def _():
      one(i)
    return carry

  lax.fori_loop(0, -(-blocks // programs), step, 0)


def _stats_kernel(*refs, kinds, fold, init, finish, n_out, block_c, steps, max_steps, interpret,
                  blocks, programs):
  """Each block of 64 rows (:func:`_row_blocks`): the pipelined class walk of ``fold`` over the
  inputs (``kinds``), then ``finish(carry)`` (``n_out`` per-row vectors) to GMEM through shared
  memory."""
  plgpu = _plgpu()
  lay = _Layout(interpret)
  n_in = len(kinds)
  ins, outs, scratch = refs[:n_in], refs[n_in:n_in + n_out], refs[n_in + n_out:]

  def body(idx, *args):
    *smem, carry = args
    col = lay.cols(idx[0] * block_c, (ROWS, block_c))
    return fold(carry, col, *(lay.load(ref, k) for ref, k in zip(smem, kinds)))

  def one(i):
    carry = plgpu.emit_pipeline(body, grid=(steps,), in_specs=_specs(ins, kinds, i, block_c, lay),
                                max_concurrent_steps=max_steps, init_carry=init(lay))(*ins)
    for ref, value in zip(scratch, finish(carry)):
      ref[...] = value
    plgpu.commit_smem()
    for ref, out in zip(scratch, outs):
      plgpu.copy_smem_to_gmem(ref, out.at[pl.ds(i * ROWS, ROWS)])
    plgpu.wait_smem_to_gmem(0)  # (the scratch is written again by the next block)

  _row_blocks(one, blocks, programs)


def _write_kernel(*refs, kinds, tiles, n_out, block_c, steps, max_steps, interpret, blocks,
                  programs):
  """Each block of 64 rows (:func:`_row_blocks`): the pipelined class walk that writes
  ``tiles(col, *blocks)`` (``n_out`` ``[64, block_c]`` tiles per step). Each output tile is
  stored into one of two shared-memory slots and copied out by TMA while the next is computed
  (the copy of two steps back has finished reading its slot before the slot is written again;
  every copy has finished before the next block of rows starts)."""
  plgpu = _plgpu()
  lay = _Layout(interpret)
  n_in = len(kinds)
  ins, outs, slots = refs[:n_in], refs[n_in:n_in + n_out], refs[n_in + n_out:]

  def one(i):
    def body(idx, *smem):
      j = idx[0]
      col = lay.cols(j * block_c, (ROWS, block_c))
      values = tiles(col, *(lay.load(ref, k) for ref, k in zip(smem, kinds)))
      slot = lax.rem(j, 2)
      for value, buf in zip(values, slots):
        buf.at[slot][...] = value.astype(buf.dtype)
      plgpu.commit_smem()
      for buf, out in zip(slots, outs):
        plgpu.copy_smem_to_gmem(buf.at[slot],
                                out.at[pl.ds(i * ROWS, ROWS), pl.ds(j * block_c, block_c)],
                                commit_group=False)
      plgpu.commit_smem_to_gmem_group()
      plgpu.wait_smem_to_gmem(1, wait_read_only=True)

    plgpu.emit_pipeline(body, grid=(steps,), in_specs=_specs(ins, kinds, i, block_c, lay),
                        max_concurrent_steps=max_steps)(*ins)
    plgpu.wait_smem_to_gmem(0)  # (the slots are written again by the next block)

  _row_blocks(one, blocks, programs)


# ------------------------------------------------------------------------------------------------
# Cross-entropy: the statistics fold and the gradient tiles.
# ------------------------------------------------------------------------------------------------
def _xent_init(lay):
  zero = lay.row_vector(0.0)
  return (lay.row_vector(_NEG), zero, zero, zero, zero, zero)


def _xent_finish(carry, *, sparse):
  """The raw statistics of :func:`rowmath.loss_from_stats` (dense: :func:`rowmath.block_tail`)."""
  m, z, zc, a, b, sx = carry
  return m, z + zc if sparse else rowmath.block_tail(z, zc), a, b, sx


def _xent_fold(carry, col, x, y, w=None, *, sparse, opts, c):
  """Folds one tile into the online statistics ``(m, z, zc, a, b, sum_x)``
  (:func:`rowmath.loss_from_stats`; ``zc`` compensates ``z``). ``x``: the raw logits (upcast and
  capped here; the padded classes ``-inf``); ``y``: the rows' local labels ``[64]`` or the label
  tile; ``w``: the class weights of these classes (dense labels: ``a``, ``b`` of ``w y``;
  smoothing: ``sum_x = sum(w x)``)."""
  m, z, zc, a, b, sx = carry
  shape = x.shape
  valid = col < c
  x = jnp.where(valid, rowmath.prep_logits(x, opts).astype(jnp.float32), -jnp.inf)
  wv = None if w is None else _bcast_col(w.astype(jnp.float32), shape)
  m_new = jnp.maximum(m, x.max(axis=1))
  e = jnp.exp(x - _bcast(m_new, shape))
  if sparse:
    is_label = (col == _bcast(y, shape)) & valid
    e = jnp.where(is_label, 0.0, e)
    b = b + jnp.where(is_label, x, 0.0).sum(axis=1)
  else:  # the tile's maxima enter as a count, after its tail (rowmath.block_tail)
    top = x == _bcast(m_new, shape)
    e = jnp.where(top, 0.0, e)
  # (m starts at the float32 minimum, not -inf: m - m_new is never NaN; exp_diff corrects its
  # rounding, 8 ulps of the whole sum at a jump of 20 in the max)
  z, zc = rowmath.add_rescaled(z, zc, rowmath.exp_diff(m, m_new), e.sum(axis=1), 1.0)
  if not sparse:
    z, zc = rowmath.add_rescaled(z, zc, 1.0, jnp.where(top, 1.0, 0.0).sum(axis=1), 1.0)
  if opts.label_smoothing:
    sx = sx + jnp.where(valid, x if wv is None else x * wv, 0.0).sum(axis=1)
  if not sparse:
    yv = jnp.where(valid, y.astype(jnp.float32), 0.0)
    if wv is not None:
      yv = yv * wv
    b = (b + jnp.where(a == 0, 0.0, (m - m_new) * a)
         + jnp.where(yv == 0, 0.0, yv * (x - _bcast(m_new, shape))).sum(axis=1))
    a = a + yv.sum(axis=1)
  return m_new, z, zc, a, b, sx


def _xent_tiles(col, x, y, m, inv_z, coef, g, r5, *rest, sparse, opts, n_cls, want_dy):
  """``dlogits`` (and dense ``dlabels``) of one tile from the rows' scalars ``(m, 1 / z, coef,
  g, d_lab | log_z)`` and, dense, ``(m_top, tc)`` (:func:`rowmath.top_scalars`): ``g * (coef *
  softmax - target)``, the label's entry ``d_lab`` exact (:func:`rowmath.label_grad`), dense
  the row max's (:func:`rowmath.dense_grad`); then ``w``, the class weights of these classes,
  if any."""
  eps = opts.label_smoothing
  shape = x.shape
  top = None
  if not sparse:
    top, rest = tuple(_bcast(v, shape) for v in rest[:2]), rest[2:]
  w = rest[0] if rest else None
  x = rowmath.prep_logits(x, opts).astype(jnp.float32)
  wv = None if w is None else _bcast_col(w.astype(jnp.float32), shape)
  m, inv_z, coef, g, r5 = (_bcast(v, shape) for v in (m, inv_z, coef, g, r5))
  p = jnp.exp(x - m) * inv_z
  if sparse:
    smooth = (eps / n_cls if eps else 0.0) if wv is None else (eps / n_cls) * wv
    d = jnp.where(col == _bcast(y, shape), r5, coef * p - smooth)
    return [g * d * rowmath.softcap_factor(x, opts)]
  target = (1.0 - eps) * y.astype(jnp.float32) + (eps / n_cls if eps else 0.0)
  if wv is not None:
    target = target * wv
  out = [g * rowmath.dense_grad(x, m, p, target, coef, *top) * rowmath.softcap_factor(x, opts)]
  if want_dy:
    gy = g * (1.0 - eps) if wv is None else (g * (1.0 - eps)) * wv
    out.append(gy * ((m - x) + r5))
  return out


# ------------------------------------------------------------------------------------------------
# Per-token log-probs and entropy (jxent.token_log_probs): z = cap(x) / T per row.
# ------------------------------------------------------------------------------------------------
def _lp_init(lay):
  zero = lay.row_vector(0.0)
  return (lay.row_vector(_NEG), zero, zero, zero)


def _lp_fold(carry, col, x, y, inv_t, *, opts, c):
  """Folds one tile of ``z = cap(x) * inv_t`` into ``(m, s, t, z[label])``: ``s =
  sum(exp(z - m))`` and ``t = sum(exp(z - m) (z - m))`` without the label's lane (the
  Triton kernel's ``_lp_fold``, row-wise)."""
  m, s, t, lab = carry
  shape = x.shape
  valid = col < c
  z = jnp.where(valid, rowmath.prep_logits(x, opts).astype(jnp.float32) * _bcast(inv_t, shape),
                -jnp.inf)
  m_new = jnp.maximum(m, z.max(axis=1))
  d = m - m_new
  e0 = rowmath.exp_diff(m, m_new)
  zs = z - _bcast(m_new, shape)
  is_label = (col == _bcast(y, shape)) & valid
  e = jnp.where(is_label, 0.0, jnp.exp(zs))
  t = jnp.where(s == 0, 0.0, e0 * (t + d * s)) + jnp.where(e == 0, 0.0, e * zs).sum(axis=1)
  lab = lab + jnp.where(is_label, z, 0.0).sum(axis=1)
  return m_new, s * e0 + e.sum(axis=1), t, lab


def _lp_tiles(col, x, y, inv_t, m, inv_z, g_lp, *ent, opts):
  """``dlogits`` of ``g_lp * log_prob + g_ent * entropy`` for one tile (``ent = (g_ent,
  E_p[z] - m)`` or empty: log-probs only)."""
  shape = x.shape
  capped = rowmath.prep_logits(x, opts).astype(jnp.float32)
  inv_t, m, inv_z, g_lp = (_bcast(v, shape) for v in (inv_t, m, inv_z, g_lp))
  zs = capped * inv_t - m
  p = jnp.exp(zs) * inv_z
  dz = g_lp * (jnp.where(col == _bcast(y, shape), 1.0, 0.0) - p)
  if ent:
    g_ent, centre = (_bcast(v, shape) for v in ent)
    dz = dz - g_ent * jnp.where(p == 0, 0.0, p * (zs - centre))
  return [dz * inv_t * rowmath.softcap_factor(capped, opts)]


@dataclasses.dataclass(frozen=True)
class PallasMosaicGpuKernel:
  """Pallas-on-Mosaic-GPU kernels (Hopper; ``interpret=True`` runs them on any backend, in
  Mosaic GPU interpret mode, for tests).

  Attributes:
    interpret: run the kernels in Mosaic GPU interpret mode.
    block_c: classes per tile of the class walk (a multiple of 64 up to 256; smaller rows use
      one tile).
    max_concurrent_steps: TMA copies in flight in the pipelined class walk (>= 1).
    programs: None (one program per block of 64 rows) or P, a persistent launch: P programs
      (at most the number of blocks), program ``p`` walking the blocks ``p, p + P, ...`` in turn
      (e.g. the GPU's SM count).

  Example:
    >>> import jax.numpy as jnp, jxent
    >>> kernel = jxent.PallasMosaicGpuKernel(interpret=True)
    >>> jxent.softmax_cross_entropy_with_integer_labels(
    ...     jnp.array([[1., 2., 3.], [3., 2., 1.]]), jnp.array([2, 0]), implementation=kernel)
    Array([0.40760595, 0.40760595], dtype=float32)
  """

  name: ClassVar[str] = "pallas_mosaic_gpu"
  platforms: ClassVar[tuple[str, ...]] = ("gpu", "cuda")
  class_weights: ClassVar[bool] = True  # (forward and backward; scalar reductions use them too)
  # float32 accumulation: float64 logits are refused (use XLA)
  dtypes: ClassVar[tuple] = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
  interpret: bool = False
  block_c: int = 256
  max_concurrent_steps: int = 3
  programs: Optional[int] = None

  def __post_init__(self):
    for field in ("block_c", "max_concurrent_steps") + (("programs",) if self.programs is not None
                                                         else ()):
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"PallasMosaicGpuKernel: {field} must be a positive int, got {value!r}.")
    if self.block_c % TILE or self.block_c > MAX_BLOCK_C:
      raise ValueError(f"PallasMosaicGpuKernel: block_c must be a multiple of {TILE} up to "
                       f"{MAX_BLOCK_C}, got {self.block_c}.")

  def unavailable(self, abstract_device=None) -> Optional[str]:
    """Why this kernel cannot be built with this jax, or None (the module's
    :func:`unavailable`)."""
    return unavailable(abstract_device, interpret=self.interpret)

  def _geometry(self, rows: int, c: int, piped=(), slotted=()):
    """``(padded rows, padded classes, block_c, steps, stages)``: rows in blocks of 64,
    classes in tiles of ``block_c`` (at most the classes rounded up to 64). ``piped`` and
    ``slotted`` are the dtypes of the ``[64, block_c]`` tiles that the pipeline buffers
    ``stages`` times and that the kernel double-buffers for its TMA stores: ``stages``
    (``max_concurrent_steps``) and then ``block_c`` are lowered, in that order, until the
    tiles fit in :data:`SMEM_BUDGET` bytes of shared memory."""
    bc = min(self.block_c, -(-c // TILE) * TILE)
    stages = self.max_concurrent_steps
    size = lambda bc, stages: ROWS * bc * (
        stages * sum(jnp.dtype(d).itemsize for d in piped)
        + 2 * sum(jnp.dtype(d).itemsize for d in slotted))
    while size(bc, stages) > SMEM_BUDGET and stages > 2:
      stages -= 1
    while size(bc, stages) > SMEM_BUDGET and bc > TILE:
      bc -= TILE
    cp = -(-c // bc) * bc
    steps = cp // bc
    return -(-rows // ROWS) * ROWS, cp, bc, steps, max(1, min(stages, steps))

  @staticmethod
  def _pad(v, rows_p, cols_p=None):
    pad = [(0, rows_p - v.shape[0])] + ([] if cols_p is None else [(0, cols_p - v.shape[1])])
    return jnp.pad(v, pad) if any(p for _, p in pad) else v

  def _launch(self, blocks: int):
    """``(programs in the grid, the persistent stride or None)`` for ``blocks`` blocks of rows."""
    if self.programs is None:
      return blocks, None
    p = min(self.programs, blocks)
    return p, p

  def _call(self, kernel, out_shape, grid_rows, scratch=()):
    plgpu = _plgpu()
    return plgpu.kernel(kernel, out_type=out_shape, grid=(grid_rows,), grid_names=("rows",),
                        scratch_types=list(scratch),
                        interpret=_interpret_params() if self.interpret else None,
                        compiler_params=plgpu.CompilerParams())

  def _pad_as(self, v, kind, rp, cp):
    if kind == "tile":
      return self._pad(v, rp, cp)
    return self._pad(v, rp if kind == "row" else cp)

  def _walk_stats(self, fold, init, finish, n_out, ins, kinds, c):
    """``n_out`` per-row vectors ``[R]`` from a statistics walk over the first ``c`` classes."""
    rows = ins[0].shape[0]
    rp, cp, bc, steps, stages = self._geometry(
        rows, c, piped=[a.dtype for a, k in zip(ins, kinds) if k == "tile"])
    args = [self._pad_as(a, k, rp, cp) for a, k in zip(ins, kinds)]
    grid, programs = self._launch(rp // ROWS)
    kernel = functools.partial(_stats_kernel, kinds=tuple(kinds), fold=fold, init=init,
                               finish=finish, n_out=n_out, block_c=bc, steps=steps,
                               max_steps=stages, interpret=self.interpret, blocks=rp // ROWS,
                               programs=programs)
    vec = jax.ShapeDtypeStruct((rp,), jnp.float32)
    out = self._call(kernel, (vec,) * n_out, grid,
                     [_plgpu().SMEM((ROWS,), jnp.float32)] * n_out)(*args)
    return tuple(v[:rows] for v in out)

  def _walk_write(self, tiles, out_dtypes, ins, kinds, c):
    """``[R, c]`` arrays of ``out_dtypes`` written tile by tile by ``tiles``."""
    rows = ins[0].shape[0]
    rp, cp, bc, steps, stages = self._geometry(
        rows, c, piped=[a.dtype for a, k in zip(ins, kinds) if k == "tile"], slotted=out_dtypes)
    args = [self._pad_as(a, k, rp, cp) for a, k in zip(ins, kinds)]
    grid, programs = self._launch(rp // ROWS)
    kernel = functools.partial(_write_kernel, kinds=tuple(kinds), tiles=tiles,
                               n_out=len(out_dtypes), block_c=bc, steps=steps, max_steps=stages,
                               interpret=self.interpret, blocks=rp // ROWS, programs=programs)
    lay = _Layout(self.interpret)
    out = tuple(jax.ShapeDtypeStruct((rp, cp), d) for d in out_dtypes)
    slots = [_plgpu().SMEM((2, ROWS, bc), d, transforms=lay.transforms(d, bc)) for d in out_dtypes]
    res = self._call(kernel, out, grid, slots)(*args)
    return tuple(v[:rows, :c] for v in res)

  def _stats(self, logits, labels, *, sparse, opts, c, class_weight=None):
    """The raw statistics ``(m, z, a, b, sum_x)`` of each row over its first ``c`` classes
    (integer ``labels``: this shard's class ids)."""
    ins = [logits, labels.astype(jnp.int32) if sparse else labels]
    kinds = ["tile", "row" if sparse else "tile"]
    if class_weight is not None and (not sparse or opts.label_smoothing):
      ins.append(class_weight.astype(jnp.float32))  # (integer labels otherwise need w[y] only)
      kinds.append("col")
    fold = functools.partial(_xent_fold, sparse=sparse, opts=opts, c=c)
    finish = functools.partial(_xent_finish, sparse=sparse)
    return self._walk_stats(fold, _xent_init, finish, 5, ins, kinds, c)

  def forward(self, logits, labels, *, sparse, opts, need_lse=True, class_weight=None):
    del need_lse  # (a hint: the statistics come at no extra cost here)
    rows, c = logits.shape
    if rows == 0:
      return rowmath.empty_rows(logits, labels, sparse=sparse, want_dlabels=False)
    weights = None
    if class_weight is not None:
      weights = rowmath.class_weight_rows(class_weight.astype(jnp.float32), labels, opts,
                                          sparse=sparse)
    local = rowmath.local_rows(labels, None, opts, c)[0] if sparse else labels
    stats = self._stats(logits, local, sparse=sparse, opts=opts, c=c, class_weight=class_weight)
    loss, row = rowmath.loss_from_stats(*stats, labels, sparse=sparse, opts=opts, local_c=c,
                                        weights=weights)
    # (integer labels: the label's logit as the kernel read it, 0 where it is on another shard:
    # the backward's exact label entry needs x_y - m exactly 0 where the label is the max)
    return loss, row + ((stats[3],) if sparse else ())

  def backward(self, logits, labels, stats, g, *, sparse, opts, want_dlabels=True,
               class_weight=None):
    rows, c = logits.shape
    if rows == 0:
      return rowmath.empty_rows(logits, labels, sparse=sparse, want_dlabels=want_dlabels,
                                fused=True)[1:]
    n_cls = rowmath.num_classes(c, opts)
    row_stats = tuple(v.astype(jnp.float32) for v in stats[:3])
    m, log_z, z = row_stats
    g = g.astype(jnp.float32)
    cw = None if class_weight is None else class_weight.astype(jnp.float32)
    coef, t_lab = rowmath.grad_scalars(labels, row_stats, opts, n_cls, sparse=sparse,
                                       class_weight=cw)
    if sparse:
      fifth = rowmath.label_grad(stats[3].astype(jnp.float32), row_stats, coef, opts, n_cls,
                                 t_lab=t_lab)
      labels_k, g = rowmath.local_rows(labels, g, opts, c)
      labels_k = labels_k.astype(jnp.int32)
    else:
      fifth, labels_k = log_z, labels
    want_dy = not sparse and want_dlabels
    ins = [logits, labels_k, m, 1.0 / z, coef, g, fifth]
    if not sparse:
      ins += list(rowmath.top_scalars(m, log_z, coef))
    kinds = ["tile", "row" if sparse else "tile"] + ["row"] * (len(ins) - 2)
    if cw is not None and (not sparse or opts.label_smoothing):
      ins.append(cw)
      kinds.append("col")
    tiles = functools.partial(_xent_tiles, sparse=sparse, opts=opts, n_cls=n_cls, want_dy=want_dy)
    out = self._walk_write(tiles, (logits.dtype,) + ((labels.dtype,) if want_dy else ()),
                           ins, kinds, c)
    return out[0], (out[1] if want_dy else None)

  def fused(self, logits, labels, weights, *, sparse, opts, want_dlabels=True):
    """Weighted per-row loss and the gradient of ``sum(loss * weights)``: the statistics walk,
    the row scalars in XLA, then the gradient walk (two launches; the two reads of the logits
    a one-kernel version makes too, and no ``[N, C]`` temporary)."""
    rowmath.check_whole_rows(opts)
    rows = logits.shape[0]
    if rows == 0:
      return rowmath.empty_rows(logits, labels, sparse=sparse, want_dlabels=want_dlabels, fused=True)
    loss, stats = self.forward(logits, labels, sparse=sparse, opts=opts)
    w = weights.astype(jnp.float32)
    g = rowmath.fused_weights(rowmath.zero_ignored(labels, w, opts) if sparse else w, stats)
    dx, dy = self.backward(logits, labels, stats, g, sparse=sparse, opts=opts,
                           want_dlabels=want_dlabels)
    return jnp.where(w == 0, 0.0, loss * w), dx, dy

  def logprob_stats(self, logits, labels, inv_t, *, opts):
    """``(m, s, t, z[label])`` per row for :func:`jxent.token_log_probs` (``labels``: this
    shard's class ids; rows >= 1)."""
    c = logits.shape[1]
    fold = functools.partial(_lp_fold, opts=opts, c=c)
    ins = [logits, labels.astype(jnp.int32), jnp.broadcast_to(inv_t, labels.shape).astype(jnp.float32)]
    return self._walk_stats(fold, _lp_init, lambda carry: carry, 4, ins, ["tile", "row", "row"], c)

  def logprob_grad(self, logits, labels, inv_t, stats, ent, g_lp, g_ent, *, opts):
    """``dlogits`` of ``g_lp * log_prob + g_ent * entropy`` (``g_ent`` None: log-probs only;
    rows >= 1; the label's column is rewritten exactly by the caller)."""
    c = logits.shape[1]
    f32 = lambda v: jnp.broadcast_to(v, labels.shape).astype(jnp.float32)
    m, log_z, z = map(f32, stats[:3])
    ins = [logits, labels.astype(jnp.int32), f32(inv_t), m, 1.0 / z, f32(g_lp)]
    if g_ent is not None:
      ins += [f32(g_ent), log_z - f32(ent)]  # (E_p[z] - m)
    tiles = functools.partial(_lp_tiles, opts=opts)
    return self._walk_write(tiles, (logits.dtype,), ins, ["tile"] + ["row"] * (len(ins) - 1), c)[0]

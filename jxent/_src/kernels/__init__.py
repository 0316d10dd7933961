"""The kernels, side by side: each file computes the per-row loss and its gradient for one backend
(``xla``, ``chunked``, ``pallas_triton``, ``pallas_mosaic_tpu``) over the shared per-row math of
:mod:`jxent._src.kernels.rowmath`. No kernel imports another kernel or the registry
(:mod:`jxent._src.dispatch`), which knows them all; adding a backend is one file here and one
registry line there.
"""

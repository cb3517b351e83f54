"""Golden test vectors: every variant's cases, frozen into files another backend reads.

Layout of a golden directory (format ``tinyeff-golden``, version :data:`VERSION`)::

    DIR/manifest.json             what is there, with the SHA-256 of every case file
    DIR/<variant>/<case>.npz      one file per (variant, case, dtype); float32 copies are
                                  named ``<case>_f32``

The cases of a variant are its ``example_cases`` followed by its conformance cases
(:mod:`tinyeff.testing.suite`), by default in float64 and float32 (:func:`make_cases`).

Each ``.npz`` is an ordinary NumPy zip archive that ``numpy.load(path, allow_pickle=False)``
opens.  Its entries (all plain numeric, boolean or unicode arrays; never objects):

    header            0-d unicode array: JSON text (format, version, variant, case, dtype,
                      names of args / grads / options, how each option is stored)
    arg.<name>        each differentiable input (q, k, v, bias, rel_bias, E, ...)
    opt.<name>        each array option (bool masks, random features, rotations, ...);
                      a scipy.sparse option is stored as CSR: opt.<name>.indptr,
                      opt.<name>.indices, opt.<name>.data (its shape is in the header)
    dout              the fixed upstream gradient (standard normal, seeded)
    out               forward(**args, **options)[0]
    grad.<name>       backward(dout, ctx)[name] for every differentiable input
    ctx.<field>       informational: the saved-context arrays of the reference forward that
                      are not inputs or the output (log-sum-exp, probabilities, bucket ids,
                      ...) and have at most as many entries as the case's largest input or
                      output (or :data:`CTX_MIN_ENTRIES`); never compared by the harness

Scalar options (flags, sizes, floats, strings, None) live in the header JSON; a
non-finite float is written as ``{"float": "inf"}``, a tuple as ``{"tuple": [...]}``.

How the numbers are made
------------------------
* Inputs come from ``example_cases(rng, dtype)`` of the variant, with
  ``rng = default_rng(crc32("<variant>/<seed>"))``, then from
  ``suite.suite_cases(variant, rng, dtype, size)`` with
  ``rng = default_rng(crc32("<variant>/suite/<seed>"))``; the upstream gradient of each
  case from ``default_rng(crc32("<variant>/<case>/<seed>/dout"))`` (``<case>`` without
  the ``_f32`` suffix).
* Output and gradients are always computed by the float64 reference path (``impl="ref"``
  where the variant has one).  For ``dtype=float32`` the stored float32 inputs are widened
  exactly to float64, the float64 results are rounded to float32 once at the end: the
  golden values are the correctly computed function of the stored float32 inputs.
  ``impl`` is not stored among the options (it does not change the definition).

Stability: the files are byte-identical from run to run and across thread counts.  The zip
is written by hand (entries sorted, stored uncompressed, a fixed 1980-01-01 time stamp),
arrays are little-endian and C-ordered, JSON has sorted keys.  (``np.savez`` is not used: it
stamps every entry with the current time.)  Across machines the bits are as stable as the
BLAS that NumPy calls: the same library on the same instruction set gives the same bits.

Reading (:func:`load_golden`, :func:`read_case`) checks the SHA-256 from the manifest, the
format and version, that every entry is a plain ``.npy`` array (``allow_pickle=False``), and
that every shape and dtype is what the header and the manifest say; anything else raises
:class:`GoldenError` naming the file and what is wrong.  Nothing in a file is executed.

This module is the public surface; the code is in three parts: the format, bytes to and
from a :class:`GoldenCase` (:mod:`tinyeff.testing._golden_format`), computing the cases
(:mod:`tinyeff.testing._golden_make`), and writing and verifying directories
(:mod:`tinyeff.testing._golden_files`).
"""

from __future__ import annotations

from ._golden_files import Golden, load_golden, load_manifest, read_case, write_golden
from ._golden_format import (
    CTX_MIN_ENTRIES,
    DTYPES,
    FORMAT,
    MANIFEST,
    SUFFIX,
    VERSION,
    GoldenCase,
    GoldenError,
    case_bytes,
    case_entries,
    case_name,
    manifest_text,
)
from ._golden_make import make_cases

__all__ = ["FORMAT", "VERSION", "MANIFEST", "DTYPES", "SUFFIX", "CTX_MIN_ENTRIES",
           "GoldenError", "GoldenCase", "Golden", "case_name", "make_cases", "case_entries",
           "case_bytes", "manifest_text", "write_golden", "read_case", "load_manifest",
           "load_golden"]

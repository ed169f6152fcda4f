"""Streaming GLUScope statistics of gated-MLP neurons: the math of docs/architecture.md.

This package is the only place that computes statistics; everything else feeds it or
reads its state. No Hugging Face imports: it takes a layer's ``g`` and ``u`` activations.

For each neuron and sign case ``c`` (``gate+_in+``, ``gate+_in-``, ``gate-_in+``,
``gate-_in-``) it accumulates over the counted tokens of a corpus:

* ``count[c]``: tokens in the case (``freq = count / tokens``);
* ``sum[c, q]``: float64 sums of the four quantities ``q`` (``mean = sum / count``);
* for each of the 14 ranked lists ``(c, q)`` (:data:`~gatescope.constants.TOP_LISTS`): the
  ``k`` texts whose strongest token of case ``c`` has the largest ``|q|``, with the signed
  value, the text index and the token position. Ties go to the lower text index.

Modules: ``quantities`` (the four quantities and the statistics' dtype), ``distributions``
(histogram bins, the typical examples' hash, quantiles), ``accumulator`` (the state, the
ranked lists, merging), ``batch`` (what a pass is given and gives back), ``torch_pass`` (a
batch's statistics in torch operations, any device), ``cpu_pass`` (the same as one fused
numba kernel, several times faster on a CPU) with ``cpu_int32`` (its 32-bit integer work)
and ``cpu_merge`` (the CPU's merges of candidates), and ``triton_pass`` (the same as one
fused Triton kernel, ``triton_kernel``, for GPUs; needs ``pip install gatescope[gpu]``),
and ``routed`` (a mixture-of-experts layer's statistics, each expert over its routed tokens).
"""

from gatescope.stats.accumulator import NeuronStats
from gatescope.stats.batch import Workspace
from gatescope.stats.quantities import gated_quantities, stats_dtype

__all__ = ["NeuronStats", "Workspace", "gated_quantities", "stats_dtype"]

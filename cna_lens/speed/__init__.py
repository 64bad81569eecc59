"""Speed code that stock engines do not offer on CPU, on public APIs of transformers only.

:func:`shrink_generate`: greedy decoding of a static, left-padded batch from which every row leaves
as soon as it emits end-of-sequence (:mod:`cna_lens.speed.shrink`). :func:`check_supported` fails
loudly where the transformers APIs it needs are missing. :mod:`cna_lens.speed.grouped` decodes the
answers of several neuron scalings in one such batch (a search's trials).
"""

from .shrink import check_supported, shrink_generate

__all__ = ["check_supported", "shrink_generate"]

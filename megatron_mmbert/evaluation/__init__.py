"""Evaluation of checkpoints: per-language MLM loss and accuracy on a manifest (``tools/evaluate.py``),
means and resource groups, side-by-side comparison, and plots (``tools/plot.py``).

* :mod:`.data` -- evaluation rows and masks, a function of (seed, language, row) only;
* :mod:`.models` -- megatron checkpoints at any layout and HF directories, as logits;
* :mod:`.metrics` -- the math: loss / accuracy sums, means, groups, comparison;
* :mod:`.run` -- ``evaluate(cfg)`` and the output files; :mod:`.cli` its command line;
* :mod:`.plots` -- schedule, loss curves and comparison pictures (matplotlib, optional).
"""

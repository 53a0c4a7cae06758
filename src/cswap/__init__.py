"""cswap: causal, explainability-aware structured pruning of pretrained image classifiers."""

__version__ = "0.1.0"

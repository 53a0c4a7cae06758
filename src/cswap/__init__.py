"""cswap: causal, explainability-aware structured pruning of pretrained image classifiers.

>>> import cswap
>>> result = cswap.prune(model, calibration, target_params=0.5)  # doctest: +SKIP
>>> result.save("out")  # doctest: +SKIP
>>> pruned = cswap.load("out")  # doctest: +SKIP
"""

__version__ = "0.1.0"

__all__ = ["PruneResult", "load", "load_spec", "prune", "score"]


def __getattr__(name: str):
    # Lazy, so that `import cswap` stays cheap and the CLI starts fast.
    if name in __all__:
        from cswap import api

        return getattr(api, name)
    raise AttributeError(f"module 'cswap' has no attribute {name!r}")

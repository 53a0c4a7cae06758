"""Validation of masked models (cswap.evaluate): early rejection and prefix reuse.

Oracle: the masked model's own forward pass over every validation image (no cache, no
threshold), compared bit for bit (logits with torch.equal, Validation with ==).
"""

import torch

from conftest import TinyNet, randomize_batchnorm
from cswap.compensation import measure_means
from cswap.evaluate import ValidationPrefix, masked_validation
from cswap.intervene import removed
from cswap.units import discover_units


def _setting(images: int = 96, batch: int = 16):
    torch.manual_seed(11)
    model = randomize_batchnorm(TinyNet(width=6)).eval()
    x = torch.randn(images, 1, 14, 14)
    with torch.no_grad():
        reference = model(x).argmax(dim=1)
    space = discover_units(model, x[:1])
    lstsq = measure_means(model, space, x, mode="lstsq")
    batches = [(x[i : i + batch], reference[i : i + batch]) for i in range(0, images, batch)]
    return model, space, lstsq, batches, reference


def _units_of(space, root: str) -> list[int]:
    return list(next(group for group in space.groups if group.root == root).unit_ids)


def test_cached_prefix_validation_equals_full_validation_bit_for_bit():
    model, space, lstsq, batches, reference = _setting()
    prefix = ValidationPrefix(model, space, batches)
    deep, deeper = _units_of(space, "down.0"), _units_of(space, "hidden")
    shallow = _units_of(space, "body.0")
    accepted = (deep[0], shallow[1])
    trials = [  # from the accepted model: deeper changes (hits), then a shallower one (a miss)
        accepted,
        (*accepted, deeper[0], deeper[3]),
        (*accepted, deep[2]),
        (*accepted, deeper[1], deep[3]),
        (*accepted, shallow[0]),
        (*accepted, shallow[0], deeper[2]),
    ]
    for number, units in enumerate(trials):
        full = masked_validation(model, space, units, batches, reference, compensation=lstsq)
        cached = masked_validation(
            model, space, units, batches, reference, compensation=lstsq, prefix=prefix
        )
        assert cached == full
        with torch.no_grad(), removed(model, space, units, lstsq):
            run = prefix.step(units)
            if number > 0:
                assert run is not None
            for index, (images, _) in enumerate(batches):
                if run is not None:
                    assert torch.equal(run(index, images), model(images))
        if number == 0:
            prefix.record(units, full, threshold=0.0)  # the accepted model
    assert prefix.hits > 0


def test_early_rejection_keeps_the_full_validations_verdict():
    model, space, lstsq, batches, reference = _setting()
    total = sum(len(labels) for _, labels in batches)
    many = [u for group in space.groups for u in list(group.unit_ids)[:-1]]  # far below
    full = masked_validation(model, space, many, batches, reference, compensation=lstsq)
    early = masked_validation(
        model, space, many, batches, reference, compensation=lstsq, threshold=0.9
    )
    assert full.accuracy < 0.9 and full.complete
    assert not early.complete and early.images < total
    assert full.accuracy <= early.accuracy < 0.9  # a bound on the full accuracy, same verdict
    one = [_units_of(space, "hidden")[0]]  # far above a threshold of 0.2
    full = masked_validation(model, space, one, batches, reference, compensation=lstsq)
    kept = masked_validation(
        model, space, one, batches, reference, compensation=lstsq, threshold=0.2
    )
    assert full.accuracy >= 0.2 and kept == full and kept.complete and kept.images == total

"""Model fingerprints (safety_units.utils.fingerprints): a few weight tensors hashed, spread over the model, so a map
or cache computed on other weights is told apart, whatever the load dtype; the key ignores the key order."""
import re

import torch
from torch import nn

from safety_units.utils.fingerprints import fingerprint_key, model_fingerprint, weight_hash


def stack(n: int = 7) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(4, 4) for _ in range(n)])


def test_weight_hash_reads_first_middle_and_last_matrices_only():
    model = stack()  # 7 weight matrices: hashed are 0, 7 // 3 = 2, 2 * 7 // 3 = 4 and 6; biases never
    h = weight_hash(model)
    assert re.fullmatch(r"[0-9a-f]{20}", h) and weight_hash(stack()) == h
    with torch.no_grad():
        for i in (1, 3, 5):
            model[i].weight.add_(1.0)
        model[0].bias.add_(1.0)
    assert weight_hash(model) == h  # a few tensors, not the whole model
    for i in (0, 2, 4, 6):
        changed = stack()
        with torch.no_grad():
            changed[i].weight[0, 0] += 1e-2
        assert weight_hash(changed) != h, f"matrix {i} is one of the hashed tensors"
    assert weight_hash(nn.Sequential(nn.LayerNorm(4))) == "none"  # no matrix to hash


def test_model_fingerprint_without_a_config_names_the_class():
    fp = model_fingerprint(stack())
    assert fp == {"model_type": "Sequential", "architecture": "Sequential", "num_layers": None,
                  "weight_hash": weight_hash(stack())}


def test_fingerprint_key_is_order_independent_and_tells_fingerprints_apart():
    fp = model_fingerprint(stack())
    key = fingerprint_key(fp)
    assert re.fullmatch(r"[0-9a-f]{16}", key)
    assert fingerprint_key(dict(reversed(list(fp.items())))) == key
    assert fingerprint_key(fp | {"num_layers": 7}) != key


def test_fingerprint_is_dtype_independent(tiny):
    fp32 = model_fingerprint(tiny.model)
    assert model_fingerprint(tiny.model.to(torch.bfloat16))["weight_hash"] == fp32["weight_hash"]

import pytest
import torch
from torch import nn

from cswap.measure import accuracy, count_macs, count_params, measure_latency


class Custom(nn.Conv2d):
    """A conv with its own forward: module-level counters miss it, aten-level ones don't."""

    def forward(self, x):
        return nn.functional.conv2d(x, self.weight, self.bias, self.stride, self.padding)


def small_net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 8x8 output
        nn.ReLU(),
        Custom(8, 4, 3, stride=2, padding=1),  # 4x4 output
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 10),
    )


def test_macs_match_a_hand_computed_count():
    # conv1: 8 out x 8x8 positions x (3 in x 3 x 3) = 13,824
    # conv2: 4 out x 4x4 positions x (8 in x 3 x 3) = 4,608
    # linear: 64 x 10 = 640
    assert count_macs(small_net(), torch.zeros(1, 3, 8, 8)) == 13_824 + 4_608 + 640
    assert count_macs(small_net(), torch.zeros(5, 3, 8, 8)) == 5 * (13_824 + 4_608 + 640)


def test_params_count_shared_tensors_once():
    net = small_net()
    expected = (8 * 27 + 8) + (4 * 72 + 4) + (64 * 10 + 10)
    assert count_params(net) == expected
    shared = nn.Sequential(net[4], net[4])
    assert count_params(shared) == 64 * 10 + 10


def test_fused_cpu_attention_is_counted_and_matches_a_hand_count():
    from timm.models.vision_transformer import VisionTransformer

    config = dict(img_size=16, patch_size=4, in_chans=1, num_classes=3, embed_dim=32, depth=2)
    model = VisionTransformer(num_heads=4, **config).eval()
    assert model.blocks[0].attn.fused_attn  # the CPU fused kernel is what runs
    example = torch.zeros(2, 1, 16, 16)
    tokens, dim, hidden, heads, head_dim = 17, 32, 128, 4, 8
    patch_embed = dim * 16 * (4 * 4)
    per_block = (
        tokens * dim * 3 * dim  # qkv
        + 2 * heads * tokens * tokens * head_dim  # q k^T and attention @ v
        + tokens * dim * dim  # proj
        + 2 * tokens * dim * hidden  # fc1 + fc2
    )
    expected = 2 * (patch_embed + 2 * per_block + dim * 3)
    assert count_macs(model, example) == expected
    for block in model.blocks:
        block.attn.fused_attn = False
    assert count_macs(model, example) == expected


def test_latency_is_positive_and_restores_threads_and_mode():
    net = small_net().train()
    threads = torch.get_num_threads()
    milliseconds = measure_latency(net, torch.zeros(1, 3, 8, 8), warmup=1, repeats=3)
    assert milliseconds > 0
    assert torch.get_num_threads() == threads
    assert net.training


class Oracle(nn.Module):
    """Predicts class = first pixel value: accuracy is known exactly."""

    def forward(self, x):
        return nn.functional.one_hot(x[:, 0].long(), 3).float()


def test_accuracy_is_a_fraction():
    images = torch.tensor([[0.0], [1.0], [2.0], [2.0]])
    labels = torch.tensor([0, 1, 2, 0])
    assert accuracy(Oracle(), [(images, labels)]) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        accuracy(Oracle(), [])

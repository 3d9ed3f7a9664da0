import pytest
import torch


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def make_models(n: int = 3, seed: int = 0, scale: float = 0.1, dtype=torch.float32):
    """A small base state dict and ``n`` experts = base + noise (with an integer buffer left equal)."""
    g = torch.Generator().manual_seed(seed)
    base = {
        "layers.0.weight": torch.randn(16, 8, generator=g),
        "layers.0.bias": torch.randn(16, generator=g),
        "layers.1.weight": torch.randn(4, 16, generator=g),
        "position_ids": torch.arange(5),
    }
    experts = []
    for _ in range(n):
        experts.append(
            {
                k: (v + scale * torch.randn(v.shape, generator=g)).to(dtype) if v.is_floating_point() else v.clone()
                for k, v in base.items()
            }
        )
    base = {k: v.to(dtype) if v.is_floating_point() else v for k, v in base.items()}
    return base, experts

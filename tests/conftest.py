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


@pytest.fixture(scope="session")
def _moto_server():
    """A real S3-compatible server (moto's server mode) for the object-storage tests, started once."""
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{server._server.server_port}"
    server.stop()


@pytest.fixture
def s3(_moto_server, monkeypatch, tmp_path):
    """A fresh bucket on the moto server; returns its URL ``s3://NAME``. The environment points s3fs (in this process
    and in processes it spawns) at the server, and the fetch cache at a fresh folder."""
    import uuid

    import s3fs

    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": _moto_server, "LIGHTNING_MERGE_CACHE": str(tmp_path / "cache"),
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"lm-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(endpoint_url=_moto_server).mkdir(bucket)
    yield f"s3://{bucket}"
    s3fs.S3FileSystem.clear_instance_cache()

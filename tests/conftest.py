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


def write_lora_family(root, n: int = 3, each=None):
    """A tiny Llama base (``root/base``) and ``n`` LoRA adapters over it (``root/a{i}``; different ranks and target
    modules, random factors). ``each(folder, generator)`` runs after each adapter is saved (to add statistics).
    Returns ``(base folder, adapter folders)``."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "base")
    targets = (["q_proj", "v_proj"], ["q_proj", "down_proj"], ["v_proj", "o_proj"])
    g = torch.Generator().manual_seed(1)
    paths = []
    for i in range(n):
        torch.manual_seed(10 + i)
        model = peft.get_peft_model(transformers.LlamaForCausalLM(config), peft.LoraConfig(
            r=2 + i, lora_alpha=4, target_modules=targets[i % len(targets)], init_lora_weights=False))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.3, generator=g)
        folder = root / f"a{i}"
        model.save_pretrained(folder)
        if each is not None:
            each(folder, g)
        paths.append(folder)
    return root / "base", paths


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

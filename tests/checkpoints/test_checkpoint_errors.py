"""Broken checkpoints stop with an error that names the file and the tensor."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from tpa_model import CheckpointError, load_model

K_PROJ = "model.layers.2.self_attn.k_proj.weight"


@pytest.fixture
def ckpt(hf_causal, tmp_path):
    src, _ = hf_causal
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def rewrite(path, change):
    file = path / "model.safetensors"
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_tensor(ckpt):
    rewrite(ckpt, lambda t: t.pop(K_PROJ))
    with pytest.raises(CheckpointError, match=rf"{ckpt}: missing tensor '{K_PROJ}'"):
        load_model(ckpt)


def test_wrong_shape(ckpt):
    def shrink(t):
        t[K_PROJ] = t[K_PROJ][:-16].clone()

    rewrite(ckpt, shrink)
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor '{K_PROJ}' has shape \[48, 64\]"):
        load_model(ckpt)


def test_unknown_architecture(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config.json: unknown architecture \['MistralForCausalLM'\]"):
        load_model(ckpt)
    config.update(architectures=None)
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model_type 'mistral' is not supported"):
        load_model(ckpt)


@pytest.mark.parametrize("keep", [0.5, 0.999, 20])
def test_truncated_file(ckpt, keep):
    file = ckpt / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(CheckpointError, match=r"model.safetensors: .*(truncated or corrupt)"):
        load_model(ckpt)


def test_missing_shard(tmp_path):
    from conftest import save_hf_causal

    save_hf_causal(tmp_path, max_shard_size="100KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{shard.name}: missing \(listed in model.safetensors.index.json\)"):
        load_model(tmp_path)


def test_missing_or_invalid_config(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_model(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        load_model(ckpt)


def test_pickle_checkpoints_are_refused(ckpt):
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only safetensors checkpoints are loaded; .bin files: pytorch_model.bin"):
        load_model(ckpt)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_model(tmp_path / "nowhere")


def test_package_never_unpickles():
    """Checkpoints are read with safetensors only: no torch.load (pickle) anywhere in the package."""
    import pathlib
    import re

    import tpa_model

    root = pathlib.Path(tpa_model.__file__).parent
    offenders = [
        f"{path.name}:{i + 1}"
        for path in root.rglob("*.py")
        for i, line in enumerate(path.read_text().splitlines())
        if re.search(r"torch\.load\(|pickle\.load|import pickle", line) and "weights_only=True" not in line
    ]
    assert offenders == []

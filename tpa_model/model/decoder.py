"""Decoders with Tensor Product Attention: Gemma 3 (with its SigLIP vision tower) and Llama."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cache.backends import default_backend
from ..cache.kv_cache import ContiguousKVCache
from ..cache.metadata import AttentionMetadata, image_spans
from ..cache.quantization import AUTO, KVCacheDtype
from .attention import TPAttention
from .config import GEMMA3, GLOBAL, SLIDING, TextConfig
from .layers import GatedMLP, RMSNorm, Rotary, embedding
from .vision import MultiModalProjector, VisionConfig, VisionTower


class DecoderLayer(nn.Module):
    """Gemma 3: every sublayer between a norm on its input and a norm on its output."""

    def __init__(self, config: TextConfig, layer: int):
        super().__init__()
        eps = config.rms_norm_eps
        self.layer_type = config.layer_types[layer]
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.attn = TPAttention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, "gelu_tanh")
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps)

    def forward(self, x: torch.Tensor, rope, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.attn(self.input_layernorm(x), rope, meta))
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x


class LlamaDecoderLayer(nn.Module):
    """Llama: a pre-norm before attention and before the MLP (Hugging Face names the second one
    post_attention_layernorm)."""

    def __init__(self, config: TextConfig, layer: int):
        super().__init__()
        eps = config.rms_norm_eps
        self.layer_type = config.layer_types[layer]
        self.input_layernorm = RMSNorm(config.hidden_size, eps, unit_offset=False)
        self.attn = TPAttention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, unit_offset=False)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, "silu")

    def forward(self, x: torch.Tensor, rope, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.attn(self.input_layernorm(x), rope, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class GemmaTPAModel(nn.Module):
    """A decoder with TPA attention. Gemma 3: scaled embeddings, sandwich-normed layers, tied output head, and
    (4b and larger) the SigLIP vision tower whose projected features replace the image soft tokens. Llama:
    plain embeddings and pre-normed layers.

    One forward, `model(input_ids, positions, metadata)`: the new tokens of a step, packed flat [N], go
    through the paged cache the metadata describes, and logits come back for metadata.logits_indices.
    `model(input_ids)` with input_ids [batch, seq] is the same forward over a contiguous cache made for the
    call: logits [batch, seq, vocab]. `pixel_values` [num_images, 3, size, size] fill the image tokens in order.
    """

    def __init__(self, config: TextConfig, vision: VisionConfig | None = None, image_token_id: int | None = None):
        super().__init__()
        self.config = config
        # how the contiguous path (model(input_ids), generate()) stores its cache; the engine has its own
        self.kv_cache_dtype: KVCacheDtype = AUTO
        self.vision_config = vision
        self.image_token_id = image_token_id
        c = config
        gemma = c.architecture == GEMMA3
        self.embed_tokens = embedding(c.vocab_size, c.hidden_size)
        layer_class = DecoderLayer if gemma else LlamaDecoderLayer
        self.layers = nn.ModuleList(layer_class(c, i) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, unit_offset=gemma)
        self.lm_head = None if c.tie_word_embeddings else nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.rotary = nn.ModuleDict(
            {
                SLIDING: Rotary(c.head_dim, c.rope_local_theta),
                GLOBAL: Rotary(c.head_dim, c.rope_global_theta, c.rope_global_scaling, c.rope_llama3),
            }
        )
        if vision is not None:
            self.vision_tower = VisionTower(vision)
            self.multi_modal_projector = MultiModalProjector(vision, c.hidden_size)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings; Gemma scales them by sqrt(hidden), the scale rounded to the weight dtype."""
        if self.config.architecture != GEMMA3:
            return self.embed_tokens(input_ids)
        scale = torch.tensor(self.config.hidden_size**0.5, dtype=self.dtype)
        return self.embed_tokens(input_ids) * scale

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(self.norm(hidden), head)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[num_images, mm_tokens_per_image, hidden]: what replaces each image's soft tokens."""
        if self.vision_config is None:
            raise ValueError("this model has no vision tower; it cannot read images")
        return self.multi_modal_projector(self.vision_tower(pixel_values.to(self.device, self.dtype)))

    def embed_with_images(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                          image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings, with each image's projected features in place of its soft tokens, in order.

        `image_mask` [N] marks the positions the features fill (the metadata's, from each sequence's own image
        spans). Without it every image token id counts, which is right only for prompts built here; with it,
        an image token id outside every image (say, one a sequence sampled) is embedded as an ordinary token
        and cannot shift another sequence's image."""
        if self.image_token_id is None:
            if pixel_values is not None:
                raise ValueError("this model has no vision tower; it cannot read images")
            return self.embed(input_ids)
        is_image = input_ids == self.image_token_id if image_mask is None else image_mask
        if self.image_token_id >= self.config.vocab_size:  # soft tokens outside the vocabulary
            input_ids = input_ids.masked_fill(input_ids == self.image_token_id, 0)
        x = self.embed(input_ids)
        if pixel_values is None:
            return x
        features = self.image_features(pixel_values)
        if int(is_image.sum()) != features.shape[0] * features.shape[1]:
            raise ValueError(
                f"the prompt has {int(is_image.sum())} image tokens, but {features.shape[0]} image(s) "
                f"need {features.shape[1]} each"
            )
        return x.masked_scatter(is_image.unsqueeze(-1), features.to(x.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        metadata: AttentionMetadata | None = None,
        *,
        pixel_values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if metadata is None:
            return self.forward_sequences(input_ids, pixel_values)
        embeds = self.embed_with_images(input_ids, pixel_values, self.image_mask(input_ids, metadata))
        x = self.decode_layers(embeds, positions, metadata)
        return self.logits(x[metadata.logits_indices])

    def image_mask(self, input_ids: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        """Where images go: the metadata's spans; no spans, no image (all False)."""
        if metadata.image_mask is not None:
            return metadata.image_mask
        return torch.zeros_like(input_ids, dtype=torch.bool)

    def decode_layers(self, x: torch.Tensor, positions, metadata: AttentionMetadata, start: int = 0) -> torch.Tensor:
        """The decoder layers from `start` on, over hidden states x [N, D] (what layer `start` takes in):
        conversion tools rerun only the layers after the one they changed."""
        ropes = {kind: rotary(positions, x.dtype) for kind, rotary in self.rotary.items()}
        for layer in self.layers[start:]:
            x = layer(x, ropes[layer.layer_type], metadata)
        return x

    def forward_sequences(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Whole sequences [B, L] -> logits [B, L, vocab], through a cache that lives for this call."""
        B, L = input_ids.shape
        cache = ContiguousKVCache(self.config, B, L, self.dtype, self.device, backend=default_backend(self.device),
                                  cache_dtype=self.kv_cache_dtype)
        images = None
        if self.image_token_id is not None:
            images = [image_spans(row, self.image_token_id) for row in input_ids.tolist()]
        meta = cache.step(L, images=images)
        return self(input_ids.reshape(-1), meta.positions, meta, pixel_values=pixel_values).view(B, L, -1)

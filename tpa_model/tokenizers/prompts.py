"""Prompt assembly: token ids (and pixels) of a chat, the one function every front uses."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from ..model.image_processing import ImageProcessorConfig, load_image, preprocess
from ..model.vision import VisionConfig
from .gemma_tokenizer import GemmaTokenizer

BOI, EOI, IMAGE_TOKEN = "<start_of_image>", "<end_of_image>", "<image_soft_token>"


@dataclass
class PromptInputs:
    token_ids: list[int]
    pixel_values: torch.Tensor | None = None  # [num_images (with crops), 3, size, size]


def build_chat_inputs(
    tokenizer: GemmaTokenizer,
    vision: VisionConfig | None,
    messages: list[dict],
    images: Sequence[Image.Image] = (),
    pan_and_scan: bool = False,
) -> PromptInputs:
    """A chat through the template; its `{"type": "image"}` parts are `images`, in order, each expanded to its
    soft tokens (and its pan-and-scan crops'). The API, tpa-generate and LLM all build prompts here."""
    if not images:
        return PromptInputs(tokenizer.encode_chat(messages))
    if vision is None:
        raise ValueError("this model has no vision tower; it cannot read images")
    config = ImageProcessorConfig(image_size=vision.image_size, do_pan_and_scan=pan_and_scan)
    pixel_values, crops = preprocess(list(images), config)
    return PromptInputs(encode_chat_with_images(tokenizer, messages, vision.mm_tokens_per_image, crops), pixel_values)


def split_images(messages: list[dict]) -> tuple[list[dict], list[Image.Image]]:
    """Messages whose image parts carry their image (`{"type": "image", "image": PIL image, path or bytes}`)
    -> the same messages with bare image parts, and the decoded images in order."""
    images, out = [], []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") == "image" and part.get("image") is not None:
                    images.append(load_image(part["image"]))
                    part = {"type": "image"}
                parts.append(part)
            m = {**m, "content": parts}
        out.append(m)
    return out, images


def expand_images(text: str, mm_tokens_per_image: int, crops_per_image: Sequence[int] | None = None) -> str:
    """Each `<start_of_image>` the chat template wrote becomes the image's full token run.

    With pan-and-scan, an image with crops becomes its own run followed by one run per crop, worded as
    Gemma 3's processor words it.
    """
    run = f"\n\n{BOI}{IMAGE_TOKEN * mm_tokens_per_image}{EOI}\n\n"
    pieces = text.split(BOI)
    crops = list(crops_per_image or [0] * (len(pieces) - 1))
    if len(crops) != len(pieces) - 1:
        raise ValueError(f"the prompt has {len(pieces) - 1} image placeholders but {len(crops)} images were given")
    out = [pieces[0]]
    for n_crops, piece in zip(crops, pieces[1:]):
        if n_crops:
            out.append(f"Here is the original image {run} and here are some crops to help you see better "
                       + " ".join([run] * n_crops))
        else:
            out.append(run)
        out.append(piece)
    return "".join(out)


def encode_chat_with_images(
    tokenizer: GemmaTokenizer,
    messages: list[dict],
    mm_tokens_per_image: int,
    crops_per_image: Sequence[int] | None = None,
    add_generation_prompt: bool = True,
) -> list[int]:
    """Token ids of a chat whose image parts each take mm_tokens_per_image soft tokens (per crop). Control
    strings typed in message text are cut before rendering (see tokenizer.CUT), so a `<start_of_image>` there
    is text: neither an image placeholder nor a control token."""
    rendered = tokenizer.render_chat_marked(messages, add_generation_prompt=add_generation_prompt)
    return tokenizer.encode_marked(expand_images(rendered, mm_tokens_per_image, crops_per_image))

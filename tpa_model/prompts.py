"""Prompt assembly for chats with images: where each image's soft tokens go."""

from __future__ import annotations

from collections.abc import Sequence

from .tokenizer import GemmaTokenizer

BOI, EOI, IMAGE_TOKEN = "<start_of_image>", "<end_of_image>", "<image_soft_token>"


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
    """Token ids of a chat whose image parts each take mm_tokens_per_image soft tokens (per crop)."""
    rendered = tokenizer.render_chat(messages, add_generation_prompt=add_generation_prompt)
    return tokenizer.encode(expand_images(rendered, mm_tokens_per_image, crops_per_image))

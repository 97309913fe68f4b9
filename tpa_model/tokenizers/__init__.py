"""Text to token ids and back: Gemma's SentencePiece tokenizer, the `tokenizers`-based one for GGUF files and
Hugging Face directories, and the prompt assembly (chat template, image tokens) every front uses."""

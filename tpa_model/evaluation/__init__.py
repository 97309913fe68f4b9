"""What a compressed cache costs: the quality harness (perplexity, KL, agreement, passkey), the held-out
prose it reads, and the `tpa-eval` command."""

"""The decoders: config, layers, Tensor Product Attention, Gemma 3 and Llama families, the SigLIP vision tower
and its image processing. One forward(input_ids, positions, metadata) over a cache it does not own."""

"""Model files to modules: reading safetensors (and quantized formats), recognising layouts, inferring configs,
building the transformer, text encoder and VAE, and the linear layers that hold their weights."""

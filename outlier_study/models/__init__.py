"""Model loading: hub, local directory, GGUF file, embedded package, random init."""

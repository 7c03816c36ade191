"""Reading and writing models and runs: GGUF files, pretrained loading, HF export."""

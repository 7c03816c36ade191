"""Model definitions."""

from tr_align.models.llama import LlamaConfig, count_params, make_model

__all__ = ["LlamaConfig", "make_model", "count_params"]

"""Models: HF transformers definitions (Qwen2/Qwen2.5, Llama 3.x) running over packed sequences."""

from engine.models.attention import PACKED_ATTENTION, set_attention_backend
from engine.models.build import PackedCausalLM, build_model

__all__ = ["PACKED_ATTENTION", "PackedCausalLM", "build_model", "set_attention_backend"]

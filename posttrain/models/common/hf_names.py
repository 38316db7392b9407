"""Two-way renaming of state-dict keys between posttrain modules and Hugging Face modules.

Because RoPE uses HF's cos/sin convention, converting a checkpoint is renaming only: no permutes.
"""

from __future__ import annotations

import re

# Dense decoders (Llama, Qwen3 and most HF *ForCausalLM models): (ours, hf) module paths, "{}" = layer index.
DENSE_DECODER_MODULES: list[tuple[str, str]] = [
    ("tok_embeddings", "model.embed_tokens"),
    ("layers.{}.attention_norm", "model.layers.{}.input_layernorm"),
    ("layers.{}.attention.wq", "model.layers.{}.self_attn.q_proj"),
    ("layers.{}.attention.wk", "model.layers.{}.self_attn.k_proj"),
    ("layers.{}.attention.wv", "model.layers.{}.self_attn.v_proj"),
    ("layers.{}.attention.wo", "model.layers.{}.self_attn.o_proj"),
    ("layers.{}.attention.q_norm", "model.layers.{}.self_attn.q_norm"),
    ("layers.{}.attention.k_norm", "model.layers.{}.self_attn.k_norm"),
    ("layers.{}.ffn_norm", "model.layers.{}.post_attention_layernorm"),
    ("layers.{}.feed_forward.w1", "model.layers.{}.mlp.gate_proj"),
    ("layers.{}.feed_forward.w2", "model.layers.{}.mlp.down_proj"),
    ("layers.{}.feed_forward.w3", "model.layers.{}.mlp.up_proj"),
    ("norm", "model.norm"),
    ("output", "lm_head"),
]


def _compile(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(r"\{\}", r"(\d+)") + r"\.(weight|bias)$")


class StateDictNameMap:
    """Maps ``<module>.<weight|bias>`` names both ways; a name with no rule maps to None."""

    def __init__(self, modules: list[tuple[str, str]]) -> None:
        self._to_hf = [(_compile(ours), hf) for ours, hf in modules]
        self._from_hf = [(_compile(hf), ours) for ours, hf in modules]

    @staticmethod
    def _rename(name: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
        for pattern, target in rules:
            match = pattern.match(name)
            if match:
                *layer, leaf = match.groups()
                return (target.replace("{}", layer[0]) if layer else target) + "." + leaf
        return None

    def to_hf(self, name: str) -> str | None:
        return self._rename(name, self._to_hf)

    def from_hf(self, name: str) -> str | None:
        return self._rename(name, self._from_hf)

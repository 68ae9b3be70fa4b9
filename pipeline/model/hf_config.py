"""ModelConfig <-> Hugging Face LlamaConfig (transformers 5: RoPE settings live in rope_parameters)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.errors import PipelineError

if TYPE_CHECKING:  # the model package never imports the config layer at run time
    from pipeline.config import ModelConfig

# Our key -> the key in a Hugging Face Llama config.json.
HF_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "max_position_embeddings": "max_position_embeddings",
}
# Architecture keys: required for model.source=preset, optional for local/hub (then read from config.json).
SHAPE_KEYS = tuple(HF_KEYS)


def rope_parameters(model: ModelConfig) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": float(model.rope_theta)}
    if model.rope_scaling is not None:
        s = model.rope_scaling
        params.update(rope_type=s.rope_type, factor=float(s.factor), low_freq_factor=float(s.low_freq_factor),
                      high_freq_factor=float(s.high_freq_factor),
                      original_max_position_embeddings=int(s.original_max_position_embeddings))
    return params


def llama_config(model: ModelConfig):
    """The transformers LlamaConfig of a preset (all shape keys set)."""
    from transformers import LlamaConfig

    kwargs = {hf: getattr(model, ours) for ours, hf in HF_KEYS.items()}
    return LlamaConfig(
        **kwargs,
        head_dim=model.hidden_size // model.num_heads,
        hidden_act="silu",
        rms_norm_eps=model.rms_norm_eps,
        rope_parameters=rope_parameters(model),
        tie_word_embeddings=model.tie_word_embeddings,
        bos_token_id=model.bos_token_id,
        eos_token_id=model.eos_token_id,
        attention_bias=False,
        mlp_bias=False,
        initializer_range=0.02,
        dtype=model.dtype,
    )


def check_declared_shape(model: ModelConfig, hf_config: dict[str, Any], config_path: str) -> None:
    """A hub/local model whose config.json disagrees with the declared preset shape is the wrong model."""
    if hf_config.get("model_type") not in ("llama", None):
        raise PipelineError(f"{config_path}: model_type is {hf_config.get('model_type')!r}, expected 'llama'")
    stored = hf_config.get("dtype", hf_config.get("torch_dtype"))
    if model.dtype is not None and stored is not None and stored != model.dtype:
        # Local and hub weights are copied byte for byte; a dtype that would need a conversion is refused.
        raise PipelineError(f"{config_path}: weights are stored as {stored} but model.dtype={model.dtype}; local and "
                            f"hub weights are copied as stored: set model.dtype=null (precision.name sets the "
                            f"compute dtype)")
    for ours in SHAPE_KEYS:
        declared = getattr(model, ours)
        actual = hf_config.get(HF_KEYS[ours])
        if ours == "num_kv_heads" and actual is None:
            actual = hf_config.get("num_attention_heads")
        if declared is not None and actual is not None and int(declared) != int(actual):
            raise PipelineError(f"{config_path}: {HF_KEYS[ours]}={actual} but model.{ours}={declared} in params.yaml; "
                                f"fix the model config or set model.{ours}=null to take it from the checkpoint")


def shape_from_hf(hf_config: dict[str, Any]) -> dict[str, int]:
    shape = {ours: hf_config.get(hf) for ours, hf in HF_KEYS.items()}
    if shape["num_kv_heads"] is None:
        shape["num_kv_heads"] = shape["num_heads"]
    return shape


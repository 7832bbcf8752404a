"""SDXL's two text encoders: building them (tiny, random) or loading them (pretrained), and encoding prompts as
diffusers' SDXL pipeline does.

`sdxl.conditioning` calls a loader only for prompts it has not embedded yet and drops the encoders right after, so
they are never resident beside the U-Net for longer than one encoding. Imports torch and transformers inside the
functions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from sdfeat.models.families.loading import created_in, not_available, prepare

TextEncoders = tuple[Any, Any, Any, Any]  # (tokenizer, CLIPTextModel, tokenizer_2, CLIPTextModelWithProjection)
TextLoader = Callable[[], TextEncoders]

TINY_TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
    "max_position_embeddings": 77, "projection_dim": 32,
}


def tiny_tokenizer(pad: str | None = None) -> Any:
    """A CLIP BPE tokenizer over lower-case letters, digits and a few marks, built in code (transformers 5 ignores
    vocab_file/merges_file: the dicts are passed). `pad="!"`: SDXL's second tokenizer pads with "!"."""
    from transformers import CLIPTokenizer

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
    tokens = chars + [c + "</w>" for c in chars] + ["th", "the</w>", "<|startoftext|>", "<|endoftext|>"]
    extra = {} if pad is None else {"pad_token": pad}
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[("t", "h"), ("th", "e</w>")],
                         model_max_length=77, **extra)


def _random_model(cls_name: str, config: Mapping[str, Any], tokenizer: Any, seed: int, dtype: Any) -> Any:
    """A CLIP text model of `config` with deterministic random weights and the tokenizer's special ids."""
    import transformers

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    fields = {k: v for k, v in config.items() if k not in ("architectures", "model_type") and not k.startswith("_")}
    with created_in(dtype, seed):
        return getattr(transformers, cls_name)(transformers.CLIPTextConfig(**{**fields, **ids}))


def random_loader(configs: tuple[Mapping[str, Any], Mapping[str, Any]], seed: int, device: Any,
                  dtype: Any) -> TextLoader:
    """Builds both encoders afresh on each call (ViT-L's `quick_gelu` and bigG's `gelu` unless the configs say).
    Random weights make prompt text meaningless, so the tokenizers are the tiny in-code ones (their ids are valid
    for any CLIP vocabulary)."""
    def load() -> TextEncoders:
        tok, tok2 = tiny_tokenizer(), tiny_tokenizer(pad="!")
        te = _random_model("CLIPTextModel", {"hidden_act": "quick_gelu", **configs[0]}, tok, seed, dtype)
        te2 = _random_model("CLIPTextModelWithProjection", {"hidden_act": "gelu", **configs[1]}, tok2, seed + 1,
                            dtype)
        return tok, prepare(te, device, dtype), tok2, prepare(te2, device, dtype)

    return load


def pretrained_loader(source: str, revision: str | None, device: Any, dtype: Any) -> TextLoader:
    """Loads both tokenizers and encoders of an SDXL pipeline (hub id through the HF cache, or local directory)
    from safetensors on each call; absent files give a one-line `ModelNotFoundError`."""
    def load() -> TextEncoders:
        from huggingface_hub.errors import HFValidationError
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        common = {"revision": revision, "use_safetensors": True, "dtype": dtype}
        try:
            tok = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", revision=revision)
            tok2 = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", revision=revision)
            te = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **common)
            te2 = CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2", **common)
        except (OSError, HFValidationError) as err:
            raise not_available(source, "SDXL", type(err).__name__, ("*.json", "*.txt", "*.safetensors")) from None
        return tok, prepare(te, device, dtype), tok2, prepare(te2, device, dtype)

    return load


def encode(encoders: TextEncoders, prompts: list[str]) -> tuple[Any, Any]:
    """diffusers' SDXL `encode_prompt` without clip skip: ((n, 77, D1 + D2) the penultimate hidden states of both
    encoders, concatenated; (n, P) the second encoder's projected pooled output)."""
    import torch

    tok, te, tok2, te2 = encoders
    hidden = []
    with torch.inference_mode():
        for tokenizer, encoder in ((tok, te), (tok2, te2)):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids  # (n, 77)
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # (n, 77, D)
    return torch.cat(hidden, dim=-1), out[0]  # out[0] of CLIPTextModelWithProjection: text_embeds (n, P)

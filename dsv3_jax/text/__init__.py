"""Text ↔ token ids: the training tokenizers (byte, BPE) and the released DeepSeek-V3 tokenizer with its chat
template."""

from dsv3_jax.text.hf_tokenizer import HFTokenizer
from dsv3_jax.text.tokenizers import BpeTokenizer, ByteTokenizer, Tokenizer, load_tokenizer, make_tokenizer

__all__ = ["BpeTokenizer", "ByteTokenizer", "HFTokenizer", "Tokenizer", "load_tokenizer", "make_tokenizer"]

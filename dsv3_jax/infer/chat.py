"""A multi-turn chat on top of `stream`: the conversation rendered with the tokenizer's chat template (the released
DeepSeek-V3 template for `HFTokenizer`; a plain "User: / Assistant:" layout for the training tokenizers, which
have none), the reply streamed as text while it is decoded, stopped at the end-of-sentence token."""

from __future__ import annotations

from collections.abc import Iterator

from dsv3_jax.config import ModelConfig
from dsv3_jax.infer.stream import stream


def plain_chat_prompt(messages: list[dict[str, str]]) -> str:
    """The layout used when a tokenizer has no chat template."""
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


class ChatSession:
    """Holds the turns; `send(text)` yields the reply in pieces of text and records it as the assistant's turn."""

    def __init__(self, config: ModelConfig, variables: dict, tokenizer, *, system: str | None = None,
                 max_new_tokens: int = 256, temperature: float = 0.0, seed: int = 0) -> None:
        self.config, self.variables, self.tokenizer = config, variables, tokenizer
        self.system, self.max_new_tokens, self.temperature, self.seed = system, max_new_tokens, temperature, seed
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        """Forget every turn (the system prompt stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt_ids(self) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            return tok.encode_chat(self.messages, add_generation_prompt=True)
        ids = tok.encode(plain_chat_prompt(self.messages))
        return [tok.bos_id, *ids] if getattr(tok, "bos_id", None) is not None else ids

    def _stop_ids(self) -> tuple[int, ...]:
        stops = getattr(self.tokenizer, "stop_ids", None) or (self.tokenizer.eos_id,)
        return tuple(int(s) for s in stops if s is not None)

    def send(self, text: str) -> Iterator[str]:
        """Add a user turn and stream the reply's text (special tokens such as EOS are not shown)."""
        self.messages.append({"role": "user", "content": text})
        stops = self._stop_ids()
        ids: list[int] = []
        shown = ""
        limit = min(self.tokenizer.vocab_size, self.config.vocab_size)
        for token in stream(self.config, self.variables, self.prompt_ids(), self.max_new_tokens, self.temperature,
                            seed=self.seed + len(self.messages), stop_ids=stops, vocab_limit=limit):
            if token in stops:
                break
            ids.append(token)
            decoded = self.tokenizer.decode(ids)
            if decoded.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                continue
            yield decoded[len(shown):]
            shown = decoded
        self.messages.append({"role": "assistant", "content": self.tokenizer.decode(ids)})

"""The release tokenizer: a Hugging Face tokenizer directory (DeepSeek-V3's), read without `transformers`.

A directory holds `tokenizer.json` (the `tokenizers` model, read as is) and `tokenizer_config.json` (special tokens,
chat template), optionally `chat_template.jinja` (takes priority over the config's template, as in transformers) and
`generation_config.json` (extra stop ids). Nothing is assumed about ids: bos/eos/pad are whatever the files say
(DeepSeek-V3: bos `<｜begin▁of▁sentence｜>` = 0, eos = pad `<｜end▁of▁sentence｜>` = 1; 128,815 ids).

Encoding and chat rendering reproduce `transformers.AutoTokenizer` (5.x) for the same call:

* `encode(text)` is `tokenizer(text)["input_ids"]` when the tokenizer.json post-processor adds nothing (V3's is a
  ByteLevel offsets fixer; transformers ignores the config's `add_bos_token` once tokenizer.json exists). Added tokens
  typed in the text (`<｜User｜>`, `<｜end▁of▁sentence｜>`) become their ids, exactly as transformers does unless
  asked for `sanitize_control_tokens=True`; `encode_special_tokens` stays False.
* `render_chat` is `apply_chat_template(messages, tokenize=False)`: the same sandboxed jinja2 environment
  (trim_blocks, lstrip_blocks, loopcontrols, a `{% generation %}` tag, `raise_exception`, `strftime_now`, a
  non-escaping `tojson`), the same variables (messages with None-valued keys dropped, `tools` and `documents` None,
  `add_generation_prompt`, the named special tokens such as `bos_token`). `encode_chat` is the `tokenize=True` ids:
  the rendered text encoded without adding specials.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from dsv3_jax.errors import TokenizerError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
GENERATION_FILE = "generation_config.json"
REQUIRED_FILES = (TOKENIZER_FILE, CONFIG_FILE)
OPTIONAL_FILES = (TEMPLATE_FILE, GENERATION_FILE)
# transformers' SPECIAL_TOKENS_ATTRIBUTES: the names a chat template sees as variables when the config sets them.
NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Names a message's reasoning may come under; transformers copies it to `reasoning_content` and `thinking`.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# transformers' clean_up_tokenization (applied only when the config asks and the model is not BPE).
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def _parse_json(raw: bytes, where: str) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise TokenizerError(f"{where}: not valid JSON: {err}") from err


def _token_content(value: Any, where: str) -> str | None:
    """The token string of a config entry: a string, an AddedToken dict {"content": ...}, or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{where}: expected a token string, an AddedToken object with 'content', or null; "
                         f"got {value!r}")


def _check_added_tokens(config: dict, backend: tokenizers.Tokenizer, where: str) -> None:
    """Every `added_tokens_decoder` entry must name the token tokenizer.json has at that id."""
    table = config.get("added_tokens_decoder", {})
    if not isinstance(table, dict):
        raise TokenizerError(f"{where} field 'added_tokens_decoder': expected an object, got {type(table).__name__}")
    for key, entry in table.items():
        content = _token_content(entry, f"{where} field 'added_tokens_decoder'[{key!r}]")
        found = backend.id_to_token(int(key)) if str(key).isdigit() else None
        if found is None or found != content:
            raise TokenizerError(f"{where} field 'added_tokens_decoder': id {key} is {content!r} there but "
                                 f"{found!r} in {TOKENIZER_FILE}")


def _stop_ids_from(generation: Any, where: str, vocab_size: int) -> list[int]:
    """The `eos_token_id` (an int or a list of ints) of a generation config."""
    if not isinstance(generation, dict):
        raise TokenizerError(f"{where}: expected a JSON object, got {type(generation).__name__}")
    value = generation.get("eos_token_id")
    ids = [] if value is None else value if isinstance(value, list) else [value]
    for i in ids:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < vocab_size:
            raise TokenizerError(f"{where} field 'eos_token_id': {i!r} is not an id in [0, {vocab_size})")
    return ids


class GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body (transformers uses it for assistant masks)."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


class TemplateNamespace(jinja2.utils.Namespace):
    """A `namespace()` that refuses underscore attributes (transformers' sandbox hardening)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set the namespace attribute {name!r}")


class TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` without access to the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
           sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.cache
def _jinja_environment() -> Any:
    """transformers' chat-template environment (utils/chat_template_utils.py), built once."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=TemplateDict(), namespace=TemplateNamespace)
    return env


def _template_errors() -> tuple[type[BaseException], ...]:
    import jinja2

    return (jinja2.TemplateError, TypeError, ValueError, LookupError, ArithmeticError)


def _chat_messages(messages: Any) -> list[dict[str, Any]]:
    """Validated copies of `messages` as transformers hands them to the template: None-valued keys dropped,
    reasoning copied to `reasoning_content` and `thinking`."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TokenizerError(f"messages: expected a non-empty list of {{'role', 'content'}} dicts, got {messages!r}")
    chat = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) or "content" not in message:
            raise TokenizerError(f"messages[{i}]: expected a dict with a string 'role' and a 'content', "
                                 f"got {message!r}")
        if not isinstance(message["content"], (str, type(None))):
            raise TokenizerError(f"messages[{i}] field 'content': expected a string or None, "
                                 f"got {type(message['content']).__name__}")
        plain = {key: value for key, value in message.items() if value is not None}
        reasoning = next((plain[key] for key in _REASONING_FIELDS if key in plain), None)
        if reasoning is not None:
            plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
        chat.append(plain)
    return chat


class HFTokenizer:
    """A Hugging Face tokenizer directory: text <-> ids, special ids from the files, and the chat template.

    Same duck-typed interface as `Tokenizer` (`vocab_size`, `encode`, `decode`, `save`, `load`), with specials
    that may sit at any id (`pad_id` may be None) and `encode`/`decode` options for bos and special tokens.
    """

    kind: ClassVar[str] = "hf"

    def __init__(self, files: Mapping[str, bytes], source: str | os.PathLike = ".") -> None:
        """Parse the raw bytes of a tokenizer directory's files (keys: file names); `source` is the directory
        named in errors. `load` reads the files; `save` writes the same bytes back."""
        self._source = Path(source)
        missing = [name for name in REQUIRED_FILES if name not in files]
        if missing:
            raise TokenizerError(f"{self._where(missing[0])}: missing (a Hugging Face tokenizer directory needs "
                                 f"{' and '.join(REQUIRED_FILES)})")
        self._files = {name: bytes(files[name]) for name in (*REQUIRED_FILES, *OPTIONAL_FILES) if name in files}
        config = _parse_json(self._files[CONFIG_FILE], self._where(CONFIG_FILE))
        if not isinstance(config, dict):
            raise TokenizerError(f"{self._where(CONFIG_FILE)}: expected a JSON object, got {type(config).__name__}")
        try:
            backend = tokenizers.Tokenizer.from_str(self._files[TOKENIZER_FILE].decode("utf-8"))
        except Exception as err:  # the Rust loader raises plain Exceptions
            raise TokenizerError(f"{self._where(TOKENIZER_FILE)}: cannot load: {err}") from err
        backend.encode_special_tokens = False  # added tokens typed in text stay tokens, as in transformers
        self._backend = backend
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)
        _check_added_tokens(config, backend, self._where(CONFIG_FILE))
        self._named = self._named_specials(config)
        self._special_ids = frozenset(
            [i for i, token in backend.get_added_tokens_decoder().items() if token.special]
            + [i for _, i in self._named.values()])
        self.add_bos_token: bool = bool(config.get("add_bos_token", False))
        self.model_max_length: int | None = config.get("model_max_length")
        self._clean_up = bool(config.get("clean_up_tokenization_spaces")) and type(backend.model).__name__ != "BPE"
        self.chat_template, self._template_origin = self._read_template(config)
        self._compiled: Any = None
        extra_stops = []
        if GENERATION_FILE in self._files:
            where = self._where(GENERATION_FILE)
            extra_stops = _stop_ids_from(_parse_json(self._files[GENERATION_FILE], where), where, self._vocab_size)
        eos = [] if self.eos_id is None else [self.eos_id]
        self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys(eos + extra_stops))

    def _where(self, name: str) -> str:
        return str(self._source / name)

    def _named_specials(self, config: dict) -> dict[str, tuple[str, int]]:
        """{"bos_token": (token, id), ...} for the named special tokens the config sets."""
        named = {}
        for field in NAMED_SPECIALS:
            where = f"{self._where(CONFIG_FILE)} field {field!r}"
            token = _token_content(config.get(field), where)
            if token is None:
                continue
            token_id = self._backend.token_to_id(token)
            if token_id is None:
                raise TokenizerError(f"{where}: token {token!r} is not in the vocabulary of {TOKENIZER_FILE}")
            named[field] = (token, token_id)
        return named

    def _read_template(self, config: dict) -> tuple[str | None, str]:
        """The chat template and where it came from: chat_template.jinja first, then the config's field (a string,
        or transformers' list of {"name", "template"} of which "default" is used)."""
        if TEMPLATE_FILE in self._files:
            try:
                return self._files[TEMPLATE_FILE].decode("utf-8"), self._where(TEMPLATE_FILE)
            except UnicodeDecodeError as err:
                raise TokenizerError(f"{self._where(TEMPLATE_FILE)}: not UTF-8 text: {err}") from err
        origin = f"{self._where(CONFIG_FILE)} field 'chat_template'"
        template = config.get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template is not None and not isinstance(template, str):
            raise TokenizerError(f"{origin}: expected a template string or a list holding a 'default' template")
        return template, origin

    @classmethod
    def load(cls, directory: str | os.PathLike) -> HFTokenizer:
        """Read tokenizer.json, tokenizer_config.json and, if present, chat_template.jinja and
        generation_config.json from `directory`."""
        path = Path(directory)
        files = {}
        for name in (*REQUIRED_FILES, *OPTIONAL_FILES):
            try:
                files[name] = (path / name).read_bytes()
            except FileNotFoundError:
                continue
            except OSError as err:
                raise TokenizerError(f"{path / name}: cannot read: {err}") from err
        return cls(files, source=path)

    def save(self, directory: str | os.PathLike) -> None:
        """Write the files this tokenizer was loaded from, byte for byte, into `directory` (created if missing);
        each file is written to a temporary name first, so none is left half-written."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        for name, data in self._files.items():
            tmp = path / f".{name}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, path / name)

    # --- ids ------------------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (V3: 128,815)."""
        return self._vocab_size

    def _named_id(self, field: str) -> int | None:
        return self._named[field][1] if field in self._named else None

    @property
    def bos_id(self) -> int | None:
        """Id of the config's `bos_token` (V3: 0), None if unset."""
        return self._named_id("bos_token")

    @property
    def eos_id(self) -> int | None:
        """Id of the config's `eos_token` (V3: 1), None if unset."""
        return self._named_id("eos_token")

    @property
    def pad_id(self) -> int | None:
        """Id of the config's `pad_token` (V3: 1, the eos), None if unset."""
        return self._named_id("pad_token")

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids `decode(skip_special=True)` drops: added tokens flagged special in tokenizer.json plus the named
        specials (V3: bos, eos, pad and the place holders; not `<｜User｜>`, `<｜Assistant｜>` or `<think>`)."""
        return self._special_ids

    def check_vocab(self, model_vocab_size: int) -> None:
        """Raise unless every tokenizer id indexes the model's embedding (V3: 128,815 ids <= 129,280)."""
        if self.vocab_size > model_vocab_size:
            raise TokenizerError(f"{self._where(TOKENIZER_FILE)}: the tokenizer has {self.vocab_size} ids but the "
                                 f"model's vocab_size is {model_vocab_size}; ids >= {model_vocab_size} have no "
                                 f"embedding row")

    # --- text -----------------------------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; added tokens spelled in it (`<｜User｜>`) encode as their ids; bos prepended if
        `add_bos`. Without bos this equals transformers' `tokenizer(text)["input_ids"]` for DeepSeek-V3."""
        if not isinstance(text, str):
            raise TokenizerError(f"HFTokenizer.encode: expected a str, got {type(text).__name__}")
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if not add_bos:
            return ids
        if self.bos_id is None:
            raise TokenizerError(f"{self._where(CONFIG_FILE)} field 'bos_token': unset, so add_bos=True has no id")
        return [self.bos_id, *ids]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of `ids`; ids in `special_ids` are dropped if `skip_special`; invalid UTF-8 becomes U+FFFD."""
        ids = [int(i) for i in ids]
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise TokenizerError(f"HFTokenizer.decode: id {bad} is outside [0, {self.vocab_size})")
        if skip_special:
            ids = [i for i in ids if i not in self._special_ids]
        text = self._backend.decode(ids, skip_special_tokens=False)
        if self._clean_up:
            for before, after in _CLEAN_UP:
                text = text.replace(before, after)
        return text

    # --- chat -----------------------------------------------------------------------------------------------------

    def _template(self) -> Any:
        if self._compiled is None:
            if self.chat_template is None:
                raise TokenizerError(f"{self._template_origin}: no chat template in {CONFIG_FILE} or {TEMPLATE_FILE}")
            try:
                self._compiled = _jinja_environment().from_string(self.chat_template)
            except _template_errors() as err:
                line = getattr(err, "lineno", None)
                at = f" (template line {line})" if line else ""
                raise TokenizerError(f"{self._template_origin}: chat template does not compile{at}: {err}") from err
        return self._compiled

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The chat template applied to `messages` ([{"role", "content"}, ...]), as transformers'
        `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` renders it."""
        template = self._template()
        chat = _chat_messages(messages)
        specials = {field: token for field, (token, _) in self._named.items()}
        try:
            return template.render(messages=chat, tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt, **specials)
        except _template_errors() as err:
            raise TokenizerError(f"{self._template_origin}: chat template failed to render: "
                                 f"{type(err).__name__}: {err}") from err

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Ids of `render_chat(messages, add_generation_prompt)` (the template writes bos itself), as transformers'
        `apply_chat_template(..., tokenize=True)` gives them."""
        return self.encode(self.render_chat(messages, add_generation_prompt))

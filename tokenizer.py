"""Tokenizers for nanoRLEF, all on tiktoken and all built locally (nothing is ever downloaded).

Three ways to build one:
  Tokenizer.llama3(path)               Meta Llama 3 / 3.1 / 3.2 `tokenizer.model` (base64 rank file), with Meta's
                                       exact pre-tokenization pattern and its 256 special tokens (128000-128255).
  Tokenizer.from_tokenizer_json(path)  a Hugging Face byte-level BPE `tokenizer.json` (GPT-2, SmolLM2, Qwen2/3),
                                       converted to tiktoken ranks; anything we cannot reproduce exactly is refused.
  Tokenizer.byte_level()               ids 0-255 are raw bytes, a few specials after them: the CPU demo model.

Safety rule: `encode` never turns text into a special token. Chat prompts are assembled from ids, so a user (or a
program's output fed back as feedback) that writes "<|eot_id|>" gets ordinary text tokens, never the real one.
"""
import base64
import binascii
import json
import shutil
import unicodedata
from pathlib import Path

import tiktoken

# Meta's Llama 3 pre-tokenization regex (llama3/tokenizer.py; the same as OpenAI's cl100k_base).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# GPT-2's regex: what the `tokenizers` ByteLevel pre-tokenizer applies when use_regex is true.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Meta's layout of the 256 Llama 3 specials (llama-models, models/llama3/tokenizer.py): 12 named tokens, then
# reserved tokens numbered from 2 (0 and 1 are among the named ones) up to 256 in all. Older releases name some
# reserved slots differently (e.g. 128005, 128011); every functional token has the same id in all of them.
_LLAMA3_NAMED = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>",
]
LLAMA3_SPECIALS = _LLAMA3_NAMED + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(_LLAMA3_NAMED))]

# Meta splits text so that tiktoken never sees a huge piece (BPE is quadratic in the piece length, and
# tiktoken's Rust side used to panic on very long inputs). Only pathological runs are affected.
_MAX_ENCODE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000


class TokenizerError(ValueError):
    """A tokenizer file we cannot load exactly. The message names the file and the key or line."""


class Tokenizer:
    """A tiktoken encoding plus the special ids and the chat format of its model family.

    chat_format: "llama3" (<|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>), "chatml"
    (<|im_start|>role\\ncontent<|im_end|>\\n, Qwen/SmolLM2) or None (no chat methods).
    bos_id is None for families that use no BOS token (Qwen).
    """

    def __init__(self, name: str, pat_str: str, mergeable_ranks: dict[bytes, int], special_tokens: dict[str, int],
                 *, chat_format: str | None, bos: str | None, eos: str, eot: str, pad: str,
                 extra_stops: tuple[str, ...] = (), nfc: bool = False):
        self.name = name
        self.special_tokens = dict(special_tokens)
        self.model = tiktoken.Encoding(name=name, pat_str=pat_str, mergeable_ranks=mergeable_ranks,
                                       special_tokens=self.special_tokens)
        self.n_words: int = self.model.n_vocab  # max id + 1, specials included
        self.chat_format = chat_format
        self.nfc = nfc  # apply Unicode NFC before encoding (the tokenizer.json had an NFC normalizer)
        self.bos_id: int | None = self.special_tokens[bos] if bos is not None else None
        self.eos_id: int = self.special_tokens[eos]
        self.eot_id: int = self.special_tokens[eot]
        self.pad_id: int = self.special_tokens[pad]
        stops = [self.eot_id, self.eos_id] + [self.special_tokens[s] for s in extra_stops]
        self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys(stops))  # ordered, no duplicates

    def __repr__(self):
        return f"Tokenizer({self.name!r}, n_words={self.n_words}, chat_format={self.chat_format!r})"

    # ---------------------------------------------------------------- constructors

    @classmethod
    def llama3(cls, path) -> "Tokenizer":
        """Meta Llama 3 `tokenizer.model` (a file, or a directory that holds one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.model"
        ranks = load_tiktoken_ranks(path)
        specials = {tok: len(ranks) + i for i, tok in enumerate(LLAMA3_SPECIALS)}
        tok = cls("llama3", LLAMA3_PATTERN, ranks, specials, chat_format="llama3",
                  bos="<|begin_of_text|>", eos="<|end_of_text|>", eot="<|eot_id|>",
                  pad="<|finetune_right_pad_id|>", extra_stops=("<|eom_id|>",))
        return tok._from_file(path, ranks=ranks)

    @classmethod
    def byte_level(cls) -> "Tokenizer":
        """ids 0-255 are the bytes themselves (no merges); 8 specials at 256-263, so n_words = 264."""
        ranks = {bytes([b]): b for b in range(256)}
        names = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                 "<|eot_id|>", "<|pad|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>"]
        specials = {tok: 256 + i for i, tok in enumerate(names)}
        tok = cls("byte_level", LLAMA3_PATTERN, ranks, specials, chat_format="llama3",
                  bos="<|begin_of_text|>", eos="<|end_of_text|>", eot="<|eot_id|>", pad="<|pad|>")
        return tok._from_file(None, ranks=ranks)

    @classmethod
    def from_tokenizer_json(cls, path) -> "Tokenizer":
        """A Hugging Face byte-level BPE `tokenizer.json` (a file, or a directory that holds one).

        Every entry of added_tokens becomes a tiktoken special (so encode() never produces it from text).
        The post_processor is ignored: BOS/EOS are added only through encode(bos=, eos=).
        Chat format: Llama 3 when its header/eot specials exist, else ChatML when <|im_start|>/<|im_end|> exist
        (Qwen2/3, SmolLM2-Instruct), else none.
        """
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        return _tokenizer_from_json(cls, path)._from_file(path)

    def _from_file(self, file: Path | None, ranks: dict[bytes, int] | None = None) -> "Tokenizer":
        """Remembers the source file (for errors and save_pretrained) and, for a tokenizer built from ranks
        with LLAMA3_PATTERN, the ranks: save_tokenizer writes them as a tokenizer.json and keeps its text."""
        self.file, self.ranks, self._hf_json = file, ranks, None
        return self

    def save_pretrained(self, path) -> None:
        """Writes tokenizer.json and tokenizer_config.json (with the chat template) that HF's AutoTokenizer
        loads and that encode like this tokenizer; see save_tokenizer."""
        save_tokenizer(self, path)

    # ---------------------------------------------------------------- text <-> ids

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Text to ids. Special-token text ("<|eot_id|>") is encoded as ordinary text, never as the special."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        ids = []
        if bos:
            if self.bos_id is None:
                raise ValueError(f"tokenizer {self.name!r} has no BOS token")
            ids.append(self.bos_id)
        for chunk in _bounded_chunks(text):
            ids.extend(self.model.encode_ordinary(chunk))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids) -> str:
        """ids (any iterable of ints, e.g. a 1-D tensor) to text; invalid UTF-8 becomes U+FFFD."""
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.n_words:
                raise ValueError(f"token id {i} is outside the vocabulary of {self.name!r} (n_words={self.n_words})")
        try:
            return self.model.decode(ids)
        except KeyError as e:  # a hole in the id space (e.g. an unused id between ranks and specials)
            raise ValueError(f"token id {e.args[0]} is not a token of {self.name!r}") from None

    # ---------------------------------------------------------------- chat formatting, from ids

    def encode_header(self, role: str) -> list[int]:
        """The ids that open a turn of `role`; the model writes the content after them."""
        self._require_chat()
        if self.chat_format == "llama3":
            return ([self.special_tokens["<|start_header_id|>"]] + self.encode(role)
                    + [self.special_tokens["<|end_header_id|>"]] + self.encode("\n\n"))
        return [self.special_tokens["<|im_start|>"]] + self.encode(role + "\n")

    def encode_message(self, role: str, content: str) -> list[int]:
        """One whole turn: header + content + end-of-turn.

        llama3 strips the content, as Meta's ChatFormat and the HF chat template do. chatml encodes
        "role\\ncontent" as one string, as the HF template renders it (so a leading newline in the content
        tokenizes the same way), and ends with <|im_end|> "\\n".
        """
        self._require_chat()
        if not isinstance(content, str):
            raise TypeError(f"message content must be str, got {type(content).__name__}")
        if self.chat_format == "llama3":
            return self.encode_header(role) + self.encode(content.strip()) + self.encode_message_end()
        start = [self.special_tokens["<|im_start|>"]]
        return start + self.encode(f"{role}\n{content}") + self.encode_message_end()

    def encode_message_end(self) -> list[int]:
        """What the template writes after a message's content: <|eot_id|> (llama3), <|im_end|> "\\n" (chatml).
        Its first id is eot_id, the end-of-turn token a model samples; ChatML's newline is never sampled."""
        self._require_chat()
        return [self.eot_id] + (self.encode("\n") if self.chat_format == "chatml" else [])

    def close_turn(self, response: list[int], stopped: bool) -> tuple[list[int], list[int]]:
        """(actions, context): a sampled assistant response as the template writes its message.

        The template writes the content, then encode_message_end(). A response that stopped ends in one of
        stop_ids: that token is the model's decision to stop, kept as an action but written as eot_id, the one
        way the template ends a message (a Llama 3 turn may stop on <|eom_id|> or <|end_of_text|>, a ChatML
        turn on <|endoftext|>). The rest of the closing is context: ChatML's newline, or all of it after a
        response that the length limit cut off (the model never chose to stop there)."""
        end = self.encode_message_end()
        if not stopped:
            return list(response), end
        if not response or response[-1] not in self.stop_ids:
            raise ValueError(f"a stopped response must end in one of stop_ids {self.stop_ids}, "
                             f"got {response[-1:]}")
        return list(response[:-1]) + end[:1], end[1:]

    def encode_dialog_prompt(self, messages: list[dict]) -> list[int]:
        """BOS (llama3 only) + every message + the assistant header: the prompt to generate a reply from."""
        self._require_chat()
        ids = [self.bos_id] if self.chat_format == "llama3" else []
        for i, message in enumerate(messages):
            for key in ("role", "content"):
                if not isinstance(message, dict) or not isinstance(message.get(key), str):
                    raise ValueError(f"messages[{i}] needs a str {key!r} field, got {message!r}")
            ids += self.encode_message(message["role"], message["content"])
        return ids + self.encode_header("assistant")

    def _require_chat(self):
        if self.chat_format is None:
            raise ValueError(f"tokenizer {self.name!r} has no chat format (no Llama 3 or ChatML special tokens)")


def _bounded_chunks(text: str):
    """Split text so no chunk exceeds 400k chars and no run of (non-)whitespace exceeds 25k (Meta's limits)."""
    if len(text) <= _MAX_RUN_CHARS:  # no run can be too long: skip the scan
        yield text
        return
    for start in range(0, len(text), _MAX_ENCODE_CHARS):
        piece = text[start:start + _MAX_ENCODE_CHARS]
        run_start, run_len, run_is_space = 0, 0, piece[:1].isspace()
        for i, ch in enumerate(piece):
            if ch.isspace() != run_is_space:
                run_len, run_is_space = 1, not run_is_space
            else:
                run_len += 1
                if run_len > _MAX_RUN_CHARS:
                    yield piece[run_start:i]
                    run_start, run_len = i, 1
        yield piece[run_start:]


def load_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken rank file: one `base64(token) rank` per line, ranks 0..N-1."""
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token_b64, rank = line.split()
                token, rank = base64.b64decode(token_b64, validate=True), int(rank)
            except (ValueError, binascii.Error):
                raise TokenizerError(f"{path}:{lineno}: expected 'base64-token rank', got {line[:80]!r}") from None
            if token in ranks:
                raise TokenizerError(f"{path}:{lineno}: token {token!r} appears twice")
            ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks are not exactly 0..{len(ranks) - 1}")
    if len(ranks) < 256 or any(bytes([b]) not in ranks for b in range(256)):
        raise TokenizerError(f"{path}: not a byte-level BPE file (some of the 256 single bytes have no rank)")
    return ranks


# ==================================================================== tokenizer.json -> tiktoken
#
# How the conversion works. A byte-level BPE tokenizer.json stores tokens as strings in GPT-2's byte-to-unicode
# alphabet (each byte 0-255 is one printable character), a vocab {token: id} and an ordered merge list.
# Hugging Face's BPE applies, inside each pre-tokenized piece, the adjacent pair that comes EARLIEST in the merge
# list, again and again. tiktoken has no merge list: it merges the adjacent pair whose concatenation has the
# LOWEST rank, and that rank is also the token id. So we map every token string back to its bytes and use its id
# as its rank. The two algorithms then pick the same pair at every step when
#   (1) ids grow along the merge list (merge i creates a token whose id is >= those of merges before it), which
#       holds for trained BPE (a token's id is its merge's position) and for files derived from tiktoken ranks; and
#   (2) tiktoken never merges a pair the merge list lacks: for each multi-byte token t, running tiktoken's BPE on
#       t's bytes with only ranks < rank(t) must not end in two parts that form an unlisted merge. This is how
#       merges are recovered from tiktoken ranks (the `bpe(ranks, token, max_rank=rank)` recipe used to publish
#       cl100k/Qwen ranks as tokenizer.json), so files made that way pass. Files that list every split of every
#       token (transformers' TikTokenConverter, e.g. Llama 3's tokenizer.json) pass without running BPE.
#   (3) tiktoken first looks a whole piece up in the vocab and emits it without merging. Some real tokens cannot
#       be built by BPE from their own bytes (Llama 3 has ".:.:", BPE stops at "." ":." ":"), so tiktoken's
#       shortcut matters; Hugging Face does the same lookup only with `ignore_merges: true` (as the Llama 3 file
#       has). Such tokens are therefore refused when ignore_merges is false.
# We check all three and refuse the file otherwise; tests/test_tokenizer.py checks id parity on real text.

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map: printable Latin-1 bytes map to themselves, the rest
    (control chars, space, ...) to chars from U+0100 on, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _unicode_to_bytes_table() -> dict[int, str]:
    """str.translate table that undoes bytes_to_unicode: afterwards .encode("latin-1") gives the raw bytes.
    Characters outside the alphabet map to U+FFFF, which latin-1 cannot encode, so they raise."""
    table = {ord(c): chr(b) for b, c in bytes_to_unicode().items()}
    table.update({c: "\uffff" for c in range(256) if c not in table})
    return table


def _token_bytes(token: str, table) -> bytes:
    return token.translate(table).encode("latin-1")  # UnicodeEncodeError: not a byte-level token


def _tokenizer_from_json(cls, path: Path) -> Tokenizer:
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(spec, dict):
        raise TokenizerError(f"{path}: top level must be a JSON object")

    def fail(key, msg):
        raise TokenizerError(f"{path}: key '{key}': {msg}")

    nfc = _check_normalizer(spec.get("normalizer"), fail)
    pattern = _pattern_from_pre_tokenizer(spec.get("pre_tokenizer"), fail)
    decoder = spec.get("decoder")
    if not (isinstance(decoder, dict) and decoder.get("type") == "ByteLevel"):
        fail("decoder", f"only a ByteLevel decoder is supported, got {_type_of(decoder)}")

    model = spec.get("model")
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or "merges" not in model:
        fail("model.type", f"only byte-level BPE models are supported, got {_type_of(model)} "
                           "(Unigram/WordPiece/WordLevel and SentencePiece-style tokenizers are not)")
    if model.get("byte_fallback"):
        fail("model.byte_fallback", "byte_fallback is SentencePiece-style BPE, not byte-level BPE")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            fail(f"model.{key}", f"{model[key]!r} is not supported")
    if model.get("dropout"):
        fail("model.dropout", "BPE dropout is not deterministic")

    specials = {}
    for i, tok in enumerate(spec.get("added_tokens") or []):
        if not isinstance(tok, dict) or not isinstance(tok.get("content"), str) or not isinstance(tok.get("id"), int):
            fail(f"added_tokens[{i}]", "needs a str 'content' and an int 'id'")
        specials[tok["content"]] = tok["id"]
    ranks, token_bytes = _ranks_from_vocab(model.get("vocab"), set(specials.values()), fail)
    merges = _parse_merges(model["merges"], token_bytes, fail)
    _check_merges_match_ranks(ranks, merges, bool(model.get("ignore_merges")), fail)

    def has(*names):
        return all(n in specials for n in names)

    # Chat format, end tokens and pad, from the specials this family defines.
    eos = "<|endoftext|>" if has("<|endoftext|>") else "<|end_of_text|>" if has("<|end_of_text|>") else None
    if has("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|begin_of_text|>", "<|end_of_text|>"):
        pad = next(p for p in ("<|finetune_right_pad_id|>", "<|pad|>", "<|end_of_text|>") if has(p))
        kwargs = dict(chat_format="llama3", bos="<|begin_of_text|>", eos="<|end_of_text|>", eot="<|eot_id|>",
                      pad=pad, extra_stops=("<|eom_id|>",) if has("<|eom_id|>") else ())
    elif has("<|im_start|>", "<|im_end|>"):
        # ChatML (Qwen2/3, SmolLM2). No BOS. Pad with <|endoftext|> as Qwen does: it only ever fills positions
        # after a row stopped, which every loss masks out.
        eos = eos or "<|im_end|>"
        kwargs = dict(chat_format="chatml", bos=None, eos=eos, eot="<|im_end|>", pad=eos)
    elif eos is not None:
        kwargs = dict(chat_format=None, bos=None, eos=eos, eot=eos, pad=eos)
    else:
        fail("added_tokens", "no end-of-text token (<|endoftext|>, <|end_of_text|> or <|im_end|>) to stop on")
    try:
        return cls(path.parent.name or path.stem, pattern, ranks, specials, nfc=nfc, **kwargs)
    except ValueError as e:  # tiktoken compiles the pattern with the Rust fancy-regex crate, not Oniguruma
        fail("pre_tokenizer", f"tiktoken cannot use the pre-tokenizer regex {pattern!r}: {e}")


def _type_of(obj) -> str:
    return repr(obj.get("type")) if isinstance(obj, dict) else repr(obj)


def _check_normalizer(normalizer, fail) -> bool:
    """None, or NFC (Qwen2/3 ship one: we apply unicodedata NFC). Anything else changes text in ways we skip."""
    if normalizer is None:
        return False
    if not isinstance(normalizer, dict):
        fail("normalizer", f"expected an object, got {normalizer!r}")
    items = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
    types = [n.get("type") if isinstance(n, dict) else n for n in items]
    if any(t != "NFC" for t in types):
        fail("normalizer", f"unsupported normalizer {types} (only none or NFC)")
    return bool(types)


def _pattern_from_pre_tokenizer(pre, fail) -> str:
    """One tiktoken regex equivalent to the pre-tokenizer. Supported (the byte-level families):
      ByteLevel(use_regex=true)                           GPT-2
      Sequence[Split(Regex, Isolated), ByteLevel(use_regex=false)]   Llama 3 / Qwen2 / Qwen3
      Sequence[Digits, ByteLevel(use_regex=true)]         SmolLM2 / StarCoder (digits split off first)
    """
    key = "pre_tokenizer"
    if not isinstance(pre, dict):
        fail(key, f"expected a ByteLevel pre-tokenizer object, got {pre!r}")
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    types = [s.get("type") if isinstance(s, dict) else s for s in steps]
    if not steps or types[-1] != "ByteLevel":
        fail(key, f"unsupported pre-tokenizer {types}: the last step must be ByteLevel (SentencePiece-style "
                  "Metaspace/WhitespaceSplit tokenizers are not byte-level BPE)")
    byte_level = steps[-1]
    if byte_level.get("add_prefix_space"):
        fail(key, "ByteLevel add_prefix_space=true is not supported")
    use_regex = byte_level.get("use_regex", True)
    if types == ["ByteLevel"] and use_regex:
        return GPT2_PATTERN
    if types == ["Split", "ByteLevel"] and not use_regex:
        split = steps[0]
        regex = split.get("pattern", {}).get("Regex") if isinstance(split.get("pattern"), dict) else None
        if regex is None or split.get("behavior") != "Isolated" or split.get("invert"):
            fail(key, "only Split with a Regex pattern, behavior Isolated and invert=false is supported")
        # Split(Isolated) keeps the text between matches as pieces too; tiktoken drops unmatched text, so add an
        # alternative that matches a gap: the longest run of characters at which the pattern does not match.
        return f"(?:{regex})|(?:(?!(?:{regex}))(?s:.))+"
    if types == ["Digits", "ByteLevel"] and use_regex:
        # Digits first cuts out digits (each one alone if individual_digits), then GPT-2's regex splits each piece.
        # Folded into one regex: digits never join a leading space, and whitespace before a digit ends a piece.
        digits = r"\p{N}" if steps[0].get("individual_digits") else r"\p{N}+"
        return (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|""" + digits
                + r"""| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+""")
    fail(key, f"unsupported pre-tokenizer sequence {types} (ByteLevel use_regex={use_regex})")


def _ranks_from_vocab(vocab, special_ids: set[int], fail) -> tuple[dict[bytes, int], dict[str, bytes]]:
    """model.vocab {token string: id} -> tiktoken ranks {token bytes: id}, and the string -> bytes map."""
    if not isinstance(vocab, dict) or not vocab:
        fail("model.vocab", "must be a non-empty object {token: id}")
    table = _unicode_to_bytes_table()
    ranks, token_bytes = {}, {}
    for token, idx in vocab.items():
        if not isinstance(idx, int):
            fail("model.vocab", f"id of {token!r} must be an int, got {idx!r}")
        if idx in special_ids:
            continue  # added tokens become tiktoken specials, never mergeable text
        try:
            token_bytes[token] = _token_bytes(token, table)
        except UnicodeEncodeError:
            fail("model.vocab", f"token {token!r} is not in GPT-2's byte-level alphabet (not a byte-level BPE)")
        ranks[token_bytes[token]] = idx
    if len(set(ranks.values())) != len(ranks):
        fail("model.vocab", "two tokens share one id")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        fail("model.vocab", f"{len(missing)} of the 256 single-byte tokens are missing (e.g. byte {missing[0]})")
    return ranks, token_bytes


def _parse_merges(merges, token_bytes: dict[str, bytes], fail) -> list[tuple[bytes, bytes]]:
    """Both layouts: ["a b", ...] (older files) and [["a", "b"], ...] (tokenizers >= 0.20)."""
    if not isinstance(merges, list):
        fail("model.merges", "must be a list")
    out = []
    for i, merge in enumerate(merges):
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if not isinstance(pair, list) or len(pair) != 2:
            fail(f"model.merges[{i}]", f"expected 'a b' or [a, b], got {merge!r}")
        left, right = token_bytes.get(pair[0]), token_bytes.get(pair[1])
        if left is None or right is None:
            fail(f"model.merges[{i}]", f"{merge!r} uses a token that is not in model.vocab")
        out.append((left, right))
    return out


def _check_merges_match_ranks(ranks: dict[bytes, int], merges: list[tuple[bytes, bytes]], ignore_merges: bool,
                              fail):
    """Conditions (1)-(3) of the comment above; see there for why they make tiktoken match HF's BPE."""
    previous = -1
    for i, (left, right) in enumerate(merges):
        rank = ranks.get(left + right)
        if rank is None or left not in ranks or right not in ranks:
            fail(f"model.merges[{i}]", f"merge {left!r} + {right!r} uses or makes a token not in model.vocab")
        if rank < previous:
            fail(f"model.merges[{i}]", f"ids do not grow along the merge list ({(left + right)!r} has id {rank} "
                                       f"after id {previous}): merge order differs from rank order")
        previous = rank
    listed = set(merges)
    for token, rank in ranks.items():
        if len(token) < 2:
            continue
        if ignore_merges and all((token[:i], token[i:]) in listed for i in range(1, len(token))
                                 if token[:i] in ranks and token[i:] in ranks):
            continue  # every split is listed (as HF's tiktoken converter writes them): (2) holds, (3) is moot
        parts = _bpe_below_rank(ranks, token, rank)
        if len(parts) == 2 and tuple(parts) not in listed:
            fail("model.merges", f"tiktoken's BPE builds token {token!r} (id {rank}) from {parts}, a merge the "
                                 "list lacks: merges are not consistent with rank order")
        if len(parts) != 2 and not ignore_merges:
            fail("model.ignore_merges", f"token {token!r} (id {rank}) cannot be built by BPE from its own bytes "
                                        f"(it stops at {parts}); tiktoken emits it when a whole piece equals it, "
                                        "which matches Hugging Face only with ignore_merges=true")


def _bpe_below_rank(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's BPE on `token`: merge the lowest-ranked adjacent pair (leftmost on ties), ranks < max_rank only."""
    parts = [token[i:i + 1] for i in range(len(token))]
    get = ranks.get
    # pair_ranks[i] = rank of parts[i] + parts[i+1] (max_rank if none); only the pairs next to a merge change.
    pair_ranks = [min(get(parts[i] + parts[i + 1], max_rank), max_rank) for i in range(len(parts) - 1)]
    while pair_ranks:
        best = min(pair_ranks)
        if best >= max_rank:
            break
        i = pair_ranks.index(best)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
        del pair_ranks[i]
        if i < len(pair_ranks):
            pair_ranks[i] = min(get(parts[i] + parts[i + 1], max_rank), max_rank)
        if i > 0:
            pair_ranks[i - 1] = min(get(parts[i - 1] + parts[i], max_rank), max_rank)
    return parts


# The files a model folder may hold its tokenizer in, in the order tokenizer_for looks for them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "original/tokenizer.model")


def tokenizer_for(model_dir="", tokenizer: str = "") -> Tokenizer:
    """The one rule for a run's tokenizer (train.py and evaluate.py), first match wins:
      1. an explicit `tokenizer`: 'bytes' (the tiny byte-level one), or a tokenizer.json / .model path;
      2. a `model_dir` uses its own: tokenizer.json, else tokenizer.model, else original/tokenizer.model (a
         model_dir without one is an error: pass --tokenizer);
      3. no model_dir (the tiny demo model, trained from scratch): the byte-level tokenizer."""
    if tokenizer == "bytes" or not (tokenizer or model_dir):
        return Tokenizer.byte_level()
    path = Path(tokenizer) if tokenizer else None
    if path is None:
        for name in TOKENIZER_FILES:
            if (Path(model_dir) / name).exists():
                path = Path(model_dir) / name
                break
        else:
            raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {model_dir}: pass --tokenizer")
    return Tokenizer.llama3(path) if path.suffix == ".model" else Tokenizer.from_tokenizer_json(path)


def check_vocab(model_config, tokenizer: Tokenizer, config_file, tokenizer_file=None) -> None:
    """Every id the tokenizer can produce (text and specials) must index the model's embedding; otherwise the
    run would fail at its first generate. Raises ValueError naming both files."""
    vocab_size = model_config.vocab_size
    outside = sorted((i, t) for t, i in tokenizer.special_tokens.items() if i >= vocab_size)
    if tokenizer.n_words > vocab_size:
        what = (f"special tokens {outside[:3]}" + (" ..." if len(outside) > 3 else "")) if outside else "text"
        raise ValueError(f"tokenizer {tokenizer_file or tokenizer.file or tokenizer.name} has ids up to "
                         f"{tokenizer.n_words - 1} ({what}), but {config_file} has vocab_size={vocab_size}: "
                         "the tokenizer does not belong to this model")


# ==================================================================== saving for Hugging Face
#
# A checkpoint folder holds tokenizer.json (the tokenizers library's format) and tokenizer_config.json (the
# chat template, the special tokens), so AutoTokenizer loads it and apply_chat_template renders as we encode.
# A tokenizer loaded from a tokenizer.json is copied as it is. One built from ranks (Llama 3's
# tokenizer.model, the byte-level one) is written as transformers' TikTokenConverter does: every split of a
# token into two tokens is a merge, ordered by the token's rank, and ignore_merges makes whole-piece lookups
# win as in tiktoken; so the tokenizers library merges as tiktoken does (see the conversion comment).

# Meta-Llama-3-8B-Instruct's template; ChatML as SmolLM2 and Qwen2.5 write it (with no default system prompt).
CHAT_TEMPLATES = {
    "llama3": ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
               "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
               " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
               "{{ content }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    "chatml": ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
               " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|im_start|>assistant\n' }}{% endif %}"),
}


def save_tokenizer(tok: Tokenizer, path) -> None:
    """tokenizer.json + tokenizer_config.json in the folder `path` (see the comment above)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    out = path / "tokenizer.json"
    if tok.file is not None and tok.file.suffix == ".json":
        if not (out.exists() and out.samefile(tok.file)):
            shutil.copyfile(tok.file, out)
    elif tok.ranks is not None:
        tok._hf_json = tok._hf_json or json.dumps(_tokenizer_json_from_ranks(tok), ensure_ascii=False)
        out.write_text(tok._hf_json, encoding="utf-8")
    else:
        raise ValueError(f"cannot save tokenizer {tok.name!r}: it was built from neither a file nor ranks")
    name = {i: t for t, i in tok.special_tokens.items()}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name.get(tok.bos_id),
              "eos_token": name[tok.eot_id], "pad_token": name[tok.pad_id],
              "clean_up_tokenization_spaces": False}
    if tok.chat_format is not None:
        config["chat_template"] = CHAT_TEMPLATES[tok.chat_format]
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _tokenizer_json_from_ranks(tok: Tokenizer) -> dict:
    ranks, to_text = tok.ranks, bytes_to_unicode()
    text = lambda b: "".join(to_text[x] for x in b)  # noqa: E731
    merges = sorted((rank, ranks[t[:i]], ranks[t[i:]], t[:i], t[i:]) for t, rank in ranks.items()
                    for i in range(1, len(t)) if t[:i] in ranks and t[i:] in ranks)
    bos = {i: t for t, i in tok.special_tokens.items()}.get(tok.bos_id)
    single = [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]
    post = None if bos is None else {  # BOS before the text, as Meta's Llama 3 tokenizer.json does
        "type": "TemplateProcessing", "single": single, "pair": single + [{"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [tok.bos_id], "tokens": [bos]}}}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    return {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None,  # no NFC: ranks tokenizers
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}
                         for t, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])],
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
            byte_level]},
        "post_processor": post, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": True,
                  "vocab": {text(t): rank for t, rank in ranks.items()},
                  "merges": [[text(left), text(right)] for *_, left, right in merges]},
    }

"""Tokenizers on tiktoken, all built from local files, and the chat formats of their model families.

  Tokenizer.llama3(path)               Llama 3 / 3.1 / 3.2's `tokenizer.model` (a base64 rank file), with
                                       Meta's pre-tokenization pattern and 256 special tokens (128000-128255)
  Tokenizer.from_tokenizer_json(path)  a Hugging Face byte-level BPE `tokenizer.json` (GPT-2, SmolLM2, Qwen),
                                       as tiktoken ranks; what cannot be reproduced exactly is refused
  Tokenizer.byte_level(ranks_file)     ids 0-255 are the bytes, then the file's merges if any (the CPU demo's
                                       BPE, TINY_BPE), then a few specials

`encode` never turns text into a special token. Chat prompts are assembled from ids, so a user (or a program's
output fed back as feedback) who writes "<|eot_id|>" gets ordinary text tokens, never the real one.
"""
import base64
import binascii
import collections
import functools
import json
import shutil
import unicodedata
from pathlib import Path

import tiktoken

# Meta's Llama 3 pre-tokenization regex (llama3/tokenizer.py; OpenAI's cl100k_base has the same).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# GPT-2's regex: what the `tokenizers` ByteLevel pre-tokenizer applies when use_regex is true.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Meta's layout of the 256 Llama 3 specials (llama-models, models/llama3/tokenizer.py): 12 named tokens, then
# reserved ones numbered from 2 (0 and 1 are among the named). Older releases name some reserved slots
# differently; every functional token has the same id in all of them.
LLAMA3_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>",
]
LLAMA3_SPECIALS += [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - len(LLAMA3_SPECIALS))]

# The files a model folder may hold its tokenizer in, in the order tokenizer_for looks for them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "original/tokenizer.model")
# The tiny demo's BPE: 256 merges trained on its synthetic warm-start corpus (`python sft.py` builds it).
TINY_BPE = Path(__file__).resolve().parent / "weights" / "tiny-bpe.tiktoken"


class TokenizerError(ValueError):
    """A tokenizer file that cannot be loaded exactly. The message names the file and the key or line."""


class Tokenizer:
    """A tiktoken encoding, the special ids and the chat format of its model family: "llama3"
    (<|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>) or "chatml" (<|im_start|>role\\ncontent
    <|im_end|>\\n, Qwen and SmolLM2). bos_id is None for families with no BOS token (Qwen)."""

    def __init__(self, name: str, pattern: str, ranks: dict[bytes, int], special_tokens: dict[str, int], *,
                 chat_format: str, bos: str | None, eos: str, eot: str, pad: str,
                 extra_stops: tuple[str, ...] = (), nfc: bool = False, file: Path | None = None):
        self.name, self.file, self.ranks, self.chat_format = name, file, ranks, chat_format
        self.nfc = nfc  # Unicode NFC before encoding: the tokenizer.json had an NFC normalizer
        self.special_tokens = dict(special_tokens)
        self.model = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks,
                                       special_tokens=self.special_tokens)
        self.n_words: int = self.model.n_vocab  # the largest id + 1, specials included
        self.bos_id: int | None = None if bos is None else self.special_tokens[bos]
        self.eos_id, self.eot_id, self.pad_id = (self.special_tokens[t] for t in (eos, eot, pad))
        stops = [self.eot_id, self.eos_id] + [self.special_tokens[s] for s in extra_stops]
        self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys(stops))  # ordered, no duplicates

    @classmethod
    def llama3(cls, path) -> "Tokenizer":
        """Meta's Llama 3 `tokenizer.model`."""
        path = Path(path)
        ranks = load_tiktoken_ranks(path)
        specials = {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIALS)}
        return cls("llama3", LLAMA3_PATTERN, ranks, specials,
                   chat_format="llama3", bos="<|begin_of_text|>", eos="<|end_of_text|>", eot="<|eot_id|>",
                   pad="<|finetune_right_pad_id|>", extra_stops=("<|eom_id|>",), file=path)

    @classmethod
    def byte_level(cls, ranks_file: Path | None = None) -> "Tokenizer":
        """ids 0-255 are the bytes themselves, then the merges of `ranks_file` if given (a tiktoken rank file:
        the tiny demo's BPE, made by `train_bpe`); 8 specials after them (n_words = 264 without merges)."""
        names = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                 "<|eot_id|>", "<|pad|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>"]
        path = Path(ranks_file) if ranks_file else None
        ranks = load_tiktoken_ranks(path) if path else {bytes([b]): b for b in range(256)}
        return cls(path.stem if path else "byte_level", LLAMA3_PATTERN, ranks,
                   {t: len(ranks) + i for i, t in enumerate(names)}, chat_format="llama3",
                   bos="<|begin_of_text|>", eos="<|end_of_text|>", eot="<|eot_id|>", pad="<|pad|>", file=path)

    @classmethod
    def from_tokenizer_json(cls, path) -> "Tokenizer":
        """A Hugging Face byte-level BPE `tokenizer.json` (the conversion's comment is below). Every added
        token becomes a special, so encode() never makes one from text; the post_processor is ignored."""
        return tokenizer_from_json(cls, Path(path))

    def save_pretrained(self, path) -> None:
        """tokenizer.json (copied, or converted from the ranks: hf_tokenizer_json) and tokenizer_config.json
        with the chat template: AutoTokenizer loads them and encodes as this tokenizer does."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        out = path / "tokenizer.json"
        if self.file is not None and self.file.suffix == ".json":
            if not (out.exists() and out.samefile(self.file)):
                shutil.copyfile(self.file, out)
        else:
            out.write_text(self.hf_tokenizer_json, encoding="utf-8")
        name = {i: t for t, i in self.special_tokens.items()}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name.get(self.bos_id),
                  "eos_token": name[self.eot_id], "pad_token": name[self.pad_id],
                  "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATES[self.chat_format]}
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    # -- text <-> ids --------------------------------------------------------------------------------------

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Text to ids (after BOS with bos=True). A special token's text ("<|eot_id|>") is ordinary text."""
        ids = self.model.encode_ordinary(unicodedata.normalize("NFC", text) if self.nfc else text)
        return [self.bos_id] + ids if bos else ids

    def decode(self, ids) -> str:
        """ids (any iterable of ints, e.g. a 1-D tensor) to text; invalid UTF-8 becomes U+FFFD."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.n_words]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary of {self.name!r} "
                             f"(n_words={self.n_words})")
        try:
            return self.model.decode(ids)
        except KeyError as e:  # a hole in the id space (an unused id between the ranks and the specials)
            raise ValueError(f"token id {e.args[0]} is not a token of {self.name!r}") from None

    # -- chat formatting, from ids -------------------------------------------------------------------------

    def encode_header(self, role: str) -> list[int]:
        """The ids that open a turn of `role`; the model writes the content after them."""
        if self.chat_format == "llama3":
            return ([self.special_tokens["<|start_header_id|>"]] + self.encode(role)
                    + [self.special_tokens["<|end_header_id|>"]] + self.encode("\n\n"))
        return [self.special_tokens["<|im_start|>"]] + self.encode(role + "\n")

    def encode_message(self, role: str, content: str) -> list[int]:
        """Header + content + end of turn. llama3 strips the content, as Meta's ChatFormat and the HF template
        do; chatml encodes "role\\ncontent" as one string, as the HF template renders it."""
        if self.chat_format == "chatml":
            start = [self.special_tokens["<|im_start|>"]]
            return start + self.encode(f"{role}\n{content}") + self.encode_message_end()
        return self.encode_header(role) + self.encode(content.strip()) + self.encode_message_end()

    def encode_message_end(self) -> list[int]:
        """What the template writes after a message's content: <|eot_id|> (llama3), <|im_end|> "\\n" (chatml).
        Its first id is eot_id, the end-of-turn token a model samples; ChatML's newline is never sampled."""
        return [self.eot_id] + (self.encode("\n") if self.chat_format == "chatml" else [])

    def close_turn(self, response: list[int], stopped: bool) -> tuple[list[int], list[int]]:
        """(actions, context): a sampled assistant response as the template writes its message. A response
        that stopped ends in one of stop_ids: the model's decision, kept as an action but written as eot_id,
        the one way the template ends a message (Llama 3 may also stop on <|eom_id|> or <|end_of_text|>). The
        rest of encode_message_end() is context: ChatML's newline, or all of it after a response the length
        limit cut off (the model never chose to stop there)."""
        end = self.encode_message_end()
        if not stopped:
            return list(response), end
        if not response or response[-1] not in self.stop_ids:
            raise ValueError(f"a stopped response must end in one of stop_ids {self.stop_ids}, "
                             f"got {response[-1:]}")
        return list(response[:-1]) + end[:1], end[1:]

    def encode_dialog_prompt(self, messages: list[dict]) -> list[int]:
        """BOS (llama3 only) + every message + the assistant header: the prompt to generate a reply from."""
        ids = [self.bos_id] if self.chat_format == "llama3" else []
        for i, message in enumerate(messages):
            if not all(isinstance(message.get(key), str) for key in ("role", "content")):
                raise ValueError(f"messages[{i}] needs str 'role' and 'content' fields, got {message!r}")
            ids += self.encode_message(message["role"], message["content"])
        return ids + self.encode_header("assistant")

    @functools.cached_property
    def hf_tokenizer_json(self) -> str:
        """These ranks as a tokenizer.json, as transformers' TikTokenConverter writes one: every split of a
        token into two tokens is a merge, ordered by the token's rank, with ignore_merges (see the conversion
        comment). Cached: it takes seconds for Llama 3, and every checkpoint writes it."""
        to_text = bytes_to_unicode()
        text = lambda b: "".join(to_text[x] for x in b)  # noqa: E731
        ranks = self.ranks
        merges = sorted((rank, ranks[t[:i]], ranks[t[i:]], t[:i], t[i:]) for t, rank in ranks.items()
                        for i in range(1, len(t)) if t[:i] in ranks and t[i:] in ranks)
        bos = {i: t for t, i in self.special_tokens.items()}.get(self.bos_id)
        single = [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]
        pair = single + [{"Sequence": {"id": "B", "type_id": 1}}]
        post = None if bos is None else {  # BOS before the text, as Meta's Llama 3 tokenizer.json does
            "type": "TemplateProcessing", "single": single, "pair": pair,
            "special_tokens": {bos: {"id": bos, "ids": [self.bos_id], "tokens": [bos]}}}
        byte_level = dict(type="ByteLevel", add_prefix_space=False, trim_offsets=True, use_regex=False)
        split = dict(type="Split", pattern={"Regex": LLAMA3_PATTERN}, behavior="Isolated", invert=False)
        return json.dumps({
            "version": "1.0", "truncation": None, "padding": None, "normalizer": None,
            "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True}
                             for t, i in sorted(self.special_tokens.items(), key=lambda kv: kv[1])],
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [split, byte_level]},
            "post_processor": post, "decoder": byte_level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": True,
                      "vocab": {text(t): rank for t, rank in ranks.items()},
                      "merges": [[text(left), text(right)] for *_, left, right in merges]},
        }, ensure_ascii=False)


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


def tokenizer_for(model_dir="", tokenizer: str = "") -> Tokenizer:
    """The one rule for a run's tokenizer (train.py and evaluate.py), first match wins:
      1. an explicit `tokenizer`: 'bytes' (byte-level, no merges), or a tokenizer.json / .model path, or a
         .tiktoken rank file (its ranks, then the byte-level tokenizer's specials);
      2. a `model_dir` uses its own, the first of TOKENIZER_FILES it holds (none: an error, pass --tokenizer);
      3. no model_dir (the tiny demo model, trained from scratch): the tiny BPE, TINY_BPE."""
    if tokenizer == "bytes":
        return Tokenizer.byte_level()
    if not (tokenizer or model_dir) or Path(tokenizer).suffix == ".tiktoken":
        return Tokenizer.byte_level(Path(tokenizer) if tokenizer else TINY_BPE)
    path = Path(tokenizer) if tokenizer else next(
        (Path(model_dir) / name for name in TOKENIZER_FILES if (Path(model_dir) / name).exists()), None)
    if path is None:
        raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {model_dir}: pass --tokenizer")
    return Tokenizer.llama3(path) if path.suffix == ".model" else Tokenizer.from_tokenizer_json(path)


def check_vocab(model_config, tokenizer: Tokenizer, config_file) -> None:
    """Every id the tokenizer can produce (text and specials) must index the model's embedding, or the run
    would fail at its first generate. Raises ValueError naming both files."""
    vocab_size = model_config.vocab_size
    if tokenizer.n_words > vocab_size:
        outside = sorted((i, t) for t, i in tokenizer.special_tokens.items() if i >= vocab_size)
        what = (f"special tokens {outside[:3]}" + (" ..." if len(outside) > 3 else "")) if outside else "text"
        raise ValueError(f"tokenizer {tokenizer.file or tokenizer.name} has ids up to "
                         f"{tokenizer.n_words - 1} ({what}), but {config_file} has vocab_size={vocab_size}: "
                         "the tokenizer does not belong to this model")


def load_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken rank file: one `base64(token) rank` per line, ranks 0..N-1, the 256 bytes among them."""
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise TokenizerError(f"{path}:{lineno}: expected 'base64 rank', got {line[:80]!r}") from None
    if sorted(ranks.values()) != list(range(len(ranks))) or any(bytes([b]) not in ranks for b in range(256)):
        raise TokenizerError(f"{path}: not a byte-level BPE rank file: the ranks are not exactly 0..N-1 over "
                             "distinct tokens, with every single byte among them")
    return ranks


def train_bpe(texts: list[str], merges: int, pattern: str = LLAMA3_PATTERN) -> dict[bytes, int]:
    """Byte-level BPE (Sennrich et al. 2016, on bytes as GPT-2): from the 256 bytes, `merges` times, the most
    frequent adjacent pair within the pre-tokenized pieces becomes a token, ranked in that order (tiktoken's
    ranks). Ties go to the pair counted first, so the same texts give the same ranks."""
    import regex  # tiktoken's own dependency, which it uses for the same pattern

    counts = collections.Counter(p.encode() for text in texts for p in regex.findall(pattern, text))
    pieces = {word: [bytes([b]) for b in word] for word in counts}
    ranks = {bytes([b]): b for b in range(256)}
    for _ in range(merges):
        pairs = collections.Counter()
        for word, parts in pieces.items():
            for pair in zip(parts, parts[1:]):
                pairs[pair] += counts[word]
        if not pairs:
            break
        left, right = max(pairs, key=pairs.__getitem__)
        ranks[left + right] = len(ranks)
        for word, parts in pieces.items():
            i = 0
            while i < len(parts) - 1:
                if parts[i] == left and parts[i + 1] == right:
                    parts[i:i + 2] = [left + right]
                i += 1
    return ranks


def save_tiktoken_ranks(ranks: dict[bytes, int], path: Path) -> None:
    """The format load_tiktoken_ranks reads (and Llama 3's tokenizer.model is in)."""
    lines = (f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in sorted(ranks.items(),
                                                                                     key=lambda kv: kv[1]))
    Path(path).write_text("".join(lines))


# -- tokenizer.json -> tiktoken ----------------------------------------------------------------------------
#
# A byte-level BPE tokenizer.json stores tokens as strings in GPT-2's byte-to-unicode alphabet (each byte
# 0-255 is one printable character), a vocab {token: id} and an ordered merge list. Hugging Face's BPE
# applies, inside each pre-tokenized piece, the adjacent pair that comes EARLIEST in the merge list, again and
# again. tiktoken has no merge list: it merges the adjacent pair whose concatenation has the LOWEST rank, and
# that rank is also the token id. So every token string is mapped back to its bytes, with its id as its rank.
# The two algorithms then pick the same pair at every step when
#   (1) ids grow along the merge list (merge i makes a token whose id is >= those of the merges before it), as
#       for trained BPE (a token's id is its merge's position) and for files derived from tiktoken ranks;
#   (2) tiktoken never merges a pair the list lacks: for each multi-byte token t, tiktoken's BPE on t's bytes
#       with only the ranks below rank(t) must not end in two parts that form an unlisted merge. This is how
#       merges are recovered from tiktoken ranks (the `bpe(ranks, token, max_rank=rank)` recipe that published
#       cl100k and Qwen ranks as tokenizer.json), so such files pass; files that list every split of every
#       token (transformers' TikTokenConverter, e.g. Llama 3's tokenizer.json) pass without running BPE;
#   (3) tiktoken first looks a whole piece up in the vocab and emits it without merging. Some real tokens
#       cannot be built by BPE from their own bytes (Llama 3 has ".:.:", where BPE stops at "." ":." ":"), so
#       this shortcut matters; Hugging Face takes it only with `ignore_merges: true` (as Llama 3's file has),
#       so such tokens are refused where ignore_merges is false.
# All three are checked and a file that fails one is refused; tests/test_tokenizer.py checks ids on real text.

def tokenizer_from_json(cls, path: Path) -> Tokenizer:
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None

    def fail(key, msg):
        raise TokenizerError(f"{path}: key '{key}': {msg}")

    nfc = check_normalizer(spec.get("normalizer"), fail)
    pattern = pattern_from_pre_tokenizer(spec.get("pre_tokenizer"), fail)
    model = spec.get("model") or {}
    if model.get("type", "BPE") != "BPE" or "merges" not in model:
        fail("model.type", f"only byte-level BPE models are supported, got {model.get('type')!r} "
                           "(Unigram/WordPiece/WordLevel and SentencePiece-style tokenizers are not)")
    for key in ("byte_fallback", "continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(key):
            fail(f"model.{key}", f"{model[key]!r} is not supported in byte-level BPE")

    specials = {t["content"]: t["id"] for t in spec.get("added_tokens") or []}
    ranks, token_bytes = ranks_from_vocab(model.get("vocab") or {}, set(specials.values()), fail)
    merges = []
    for i, merge in enumerate(model["merges"]):  # ["a b", ...] in older files, [["a", "b"], ...] since 0.20
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if len(pair) != 2 or pair[0] not in token_bytes or pair[1] not in token_bytes:
            fail(f"model.merges[{i}]", f"{merge!r} is not a pair of tokens of model.vocab")
        merges.append((token_bytes[pair[0]], token_bytes[pair[1]]))
    check_merges_match_ranks(ranks, merges, bool(model.get("ignore_merges")), fail)

    def has(*names):
        return all(n in specials for n in names)

    if has("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|begin_of_text|>", "<|end_of_text|>"):
        pad = next(p for p in ("<|finetune_right_pad_id|>", "<|pad|>", "<|end_of_text|>") if has(p))
        family = dict(chat_format="llama3", bos="<|begin_of_text|>", eos="<|end_of_text|>", eot="<|eot_id|>",
                      pad=pad, extra_stops=("<|eom_id|>",) if has("<|eom_id|>") else ())
    elif has("<|im_start|>", "<|im_end|>"):
        # ChatML (Qwen2/3, SmolLM2), no BOS. Padding is <|endoftext|> as in Qwen: it only ever fills the slots
        # after a row stopped, which every loss masks out.
        eos = "<|endoftext|>" if has("<|endoftext|>") else "<|im_end|>"
        family = dict(chat_format="chatml", bos=None, eos=eos, eot="<|im_end|>", pad=eos)
    else:  # every episode is a chat
        fail("added_tokens", "has neither Llama 3's chat tokens (<|start_header_id|>, <|end_header_id|>, "
                             "<|eot_id|>) nor ChatML's (<|im_start|>, <|im_end|>)")
    try:
        return cls(path.parent.name or path.stem, pattern, ranks, specials, nfc=nfc, file=path, **family)
    except ValueError as e:  # tiktoken compiles the pattern with the Rust fancy-regex crate, not Oniguruma
        fail("pre_tokenizer", f"tiktoken cannot use the pre-tokenizer regex {pattern!r}: {e}")


def check_normalizer(normalizer, fail) -> bool:
    """None, or NFC (Qwen2/3 ship one: unicodedata applies it). Any other normalizer changes text."""
    if normalizer is None:
        return False
    items = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
    types = [n.get("type") for n in items]
    if any(t != "NFC" for t in types):
        fail("normalizer", f"unsupported normalizer {types} (only none or NFC)")
    return bool(types)


def pattern_from_pre_tokenizer(pre, fail) -> str:
    """One tiktoken regex equivalent to the pre-tokenizer. The byte-level families' pre-tokenizers:
      ByteLevel(use_regex=true)                                      GPT-2
      Sequence[Split(Regex, Isolated), ByteLevel(use_regex=false)]   Llama 3, Qwen2, Qwen3
      Sequence[Digits, ByteLevel(use_regex=true)]                    SmolLM2, StarCoder
    """
    steps = (pre or {}).get("pretokenizers", []) if (pre or {}).get("type") == "Sequence" else [pre or {}]
    types = [s.get("type") for s in steps]
    if not steps or types[-1] != "ByteLevel":
        fail("pre_tokenizer", f"unsupported pre-tokenizer {types}: the last step must be ByteLevel "
                              "(SentencePiece-style Metaspace or WhitespaceSplit is not byte-level BPE)")
    if steps[-1].get("add_prefix_space"):
        fail("pre_tokenizer", "ByteLevel add_prefix_space=true is not supported")
    use_regex = steps[-1].get("use_regex", True)
    if types == ["ByteLevel"] and use_regex:
        return GPT2_PATTERN
    if types == ["Split", "ByteLevel"] and not use_regex:
        split = steps[0]
        regex = (split.get("pattern") or {}).get("Regex")
        if regex is None or split.get("behavior") != "Isolated" or split.get("invert"):
            fail("pre_tokenizer", "only Split with a Regex pattern, Isolated and not inverted, is supported")
        # Split(Isolated) keeps the text between matches as pieces too; tiktoken drops unmatched text, so an
        # alternative matches a gap: the longest run of characters at which the pattern does not match.
        return f"(?:{regex})|(?:(?!(?:{regex}))(?s:.))+"
    if types == ["Digits", "ByteLevel"] and use_regex:
        # Digits cuts out digits first (each one alone if individual_digits), then GPT-2's regex splits each
        # piece. As one regex: digits never join a leading space, and whitespace before a digit ends a piece.
        digits = r"\p{N}" if steps[0].get("individual_digits") else r"\p{N}+"
        return (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|""" + digits
                + r"""| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+""")
    fail("pre_tokenizer", f"unsupported pre-tokenizer sequence {types} (ByteLevel use_regex={use_regex})")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map: printable Latin-1 bytes map to themselves, the rest
    (control characters, space, ...) to characters from U+0100 on, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(others)) for b in range(256)}


def ranks_from_vocab(vocab: dict, special_ids: set[int], fail) -> tuple[dict[bytes, int], dict[str, bytes]]:
    """model.vocab {token string: id} -> tiktoken ranks {token bytes: id}, and the string -> bytes map."""
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    ranks, token_bytes = {}, {}
    for token, idx in vocab.items():
        if idx in special_ids:
            continue  # added tokens become tiktoken specials, never mergeable text
        if any(c not in to_byte for c in token):
            fail("model.vocab", f"token {token!r} is not in GPT-2's byte-level alphabet: not byte-level BPE")
        token_bytes[token] = bytes(to_byte[c] for c in token)
        ranks[token_bytes[token]] = idx
    if len(set(ranks.values())) != len(ranks):
        fail("model.vocab", "two tokens share one id")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        fail("model.vocab", f"{len(missing)} single-byte tokens are missing, e.g. byte {missing[0]}")
    return ranks, token_bytes


def check_merges_match_ranks(ranks: dict[bytes, int], merges: list[tuple[bytes, bytes]], ignore_merges: bool,
                             fail):
    """Conditions (1)-(3) of the comment above, which make tiktoken's BPE match HF's."""
    previous = -1
    for i, (left, right) in enumerate(merges):
        rank = ranks.get(left + right)
        if rank is None:
            fail(f"model.merges[{i}]", f"merge {left!r} + {right!r} makes a token not in model.vocab")
        if rank < previous:
            fail(f"model.merges[{i}]", f"ids do not grow along the merge list ({(left + right)!r} has id "
                                       f"{rank} after id {previous}): merge order differs from rank order")
        previous = rank
    listed = set(merges)
    for token, rank in ranks.items():
        if len(token) < 2:
            continue
        if ignore_merges and all((token[:i], token[i:]) in listed for i in range(1, len(token))
                                 if token[:i] in ranks and token[i:] in ranks):
            continue  # every split is listed (as TikTokenConverter writes them): (2) holds, (3) is moot
        parts = bpe_below_rank(ranks, token, rank)
        if len(parts) == 2 and tuple(parts) not in listed:
            fail("model.merges", f"tiktoken's BPE builds token {token!r} (id {rank}) from {parts}, a merge "
                                 "the list lacks: merges are not consistent with rank order")
        if len(parts) != 2 and not ignore_merges:
            fail("model.ignore_merges", f"token {token!r} (id {rank}) cannot be built by BPE from its own "
                                        f"bytes (it stops at {parts}); tiktoken emits it when a whole piece "
                                        "equals it, which matches Hugging Face only with ignore_merges=true")


def bpe_below_rank(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's BPE on `token` with the ranks below max_rank: merge the lowest-ranked adjacent pair (the
    leftmost on ties) until none is left."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        pair_ranks = [ranks.get(left + right, max_rank) for left, right in zip(parts, parts[1:])]
        if min(pair_ranks) >= max_rank:
            break
        i = pair_ranks.index(min(pair_ranks))
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts

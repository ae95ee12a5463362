"""Chat prompts as token ids: the one place that knows a model's conversation format.

`ChatFormat` turns an Example into the token ids a chat model sees, piece by piece, so
that the caller always knows which ids are prompt, translation, rationale and
end-of-turn without re-tokenising a whole conversation and searching in it:

    prompt_ids(ex)                 answer_ids(ref)   answer_ids(sep + rationale,   end_of_turn_ids()
                                                              continuation=True)
    [<s> [INST] instruction+source [/INST]] [ The goods ... ] [ \\n\\n The word ... ] [ </s> ]
    [<|im_start|>system ... <|im_start|>assistant\\n] [ ... ] [ ... ] [ <|im_end|> \\n ]

    followup_ids(text): after a closed assistant turn, a new user turn and the next
    assistant header (rationale strategy "ask").

Templates
---------
- "model": the tokenizer's own Jinja `chat_template`, rendered with a sentinel
  answer to learn what comes before an answer, after it (end of turn), and how a next
  user turn starts. The template is rendered once, with a sentinel as user text; the
  frame around it is tokenised like `apply_chat_template` does, which gives the same
  ids as `apply_chat_template(..., tokenize=True)` (tested for SmolLM2 and LLaMA-2's
  template), except that special-token strings inside the data stay text.
- "llama2": `<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>`
- "mistral": `<s>[INST] {user} [/INST]{answer}</s>`; no system role, so a system prompt
  is put in front of the user text, separated by a blank line.
- "chatml": `<|im_start|>{role}\\n{text}<|im_end|>\\n` per turn, the assistant header
  `<|im_start|>assistant\\n` (SmolLM2, Qwen). No default system turn is added.
- "auto": "model" when the tokenizer has a chat template, else chosen from the
  tokenizer (an `<|im_start|>` token: chatml; "mistral" / "llama-2" in its name).

Built-in templates add bos/eos by id. All templates tokenise user text with special-token
strings treated as plain text, so a source sentence containing "</s>" cannot end a
turn early.

Sentencepiece leading space
---------------------------
LLaMA/Mistral tokenizers put "▁" (a space) before the first piece of every separately
tokenised string. That is right at the start of an answer ("[/INST] The" has a space;
Mistral's reference tokenizer also encodes the answer on its own) but wrong for text
that continues earlier text ("...euros." + "\\n\\nThe"). Continuations are encoded
behind a sentinel ("\\n") whose ids are then cut off, checked piece by piece, so the
concatenated ids decode to exactly the concatenated text. Byte-level BPE tokenizers
(SmolLM2) add no prefix and are encoded directly. Concatenated pieces can differ from
tokenising the joined string at the seams (a merge across the boundary); they always
decode to the same text, which is what the model sees at inference too (generation
continues token by token after the reference).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from radis.config import DataConfig
from radis.data.languages import language_name
from radis.errors import InputError

TEMPLATES = ("llama2", "mistral", "chatml")

# A string that no template alters, used to find where an answer sits in a rendering.
_ANSWER_SENTINEL = "RADISANSWERSENTINEL"
_USER_SENTINEL = "RADISUSERSENTINEL"
# Encoded in front of continuation text so sentencepiece's "▁" goes onto it, not the text.
_CONT_SENTINEL = "\n"

# A text piece of a prompt: (mode, text). Modes:
#   "first": tokenised as a string of its own (sentencepiece: with the leading "▁")
#   "cont":  continuing earlier text (no leading "▁")
#   "raw":   like "first", but special-token strings in it become special tokens
#            (renderings of the model's own Jinja template)
Part = int | tuple[str, str]


class ChatFormatError(InputError):
    """The tokenizer and the requested chat template do not fit together."""


class ChatFormat:
    """Token ids of chat turns for one tokenizer and one data config.

    Public API (used by segments, the rationale generator and the evaluator):

    - `prompt_ids(example) -> list[int]`: [bos] system? user(instruction + source),
      up to and including the assistant header.
    - `answer_ids(text, *, continuation) -> list[int]`: assistant text right after
      the header (continuation=False) or after earlier answer text (True).
    - `end_of_turn_ids() -> list[int]`: the tokens that close an assistant turn.
    - `followup_ids(user_text) -> list[int]`: a new user turn + assistant header,
      placed after `end_of_turn_ids()`.
    - `stop_token_ids: list[int]`: ids that end generation.
    - `decode_answer(ids) -> str`: generated ids -> answer text (cut at the first stop
      id, special tokens dropped, surrounding whitespace stripped).
    - batch forms for speed: `prompt_ids_batch(examples)`,
      `answer_ids_batch(texts, *, continuation)`.
    - `user_prompt_ids_batch(texts)`: prompts whose user turn is the given text (SDFT
      prompts, retention prompts) instead of the translation instruction.
    - `template` (the resolved name: "model", "llama2", "mistral", "chatml"),
      `template_id` (`template_identity`: the name, or the model template's hash),
      `fingerprint` (`tokenizer_fingerprint(tokenizer)`), `user_text(example)`.
    """

    def __init__(self, tokenizer: Any, data_cfg: DataConfig, template: str = "auto"):
        self.tokenizer = tokenizer
        self.data_cfg = data_cfg
        self.template = resolve_template(tokenizer, template)
        self.template_id = template_identity(tokenizer, self.template)
        self.fingerprint = tokenizer_fingerprint(tokenizer)
        self._check_instruction(data_cfg.instruction)
        self._sentinel_ids = self._encode(["first"], [_CONT_SENTINEL])[0]
        # Does this tokenizer put a "▁" in front of every separately encoded string?
        probe = "x"
        self._dummy_prefix = self._encode(["first"], [probe])[0] != self._encode_cont_sentinel([probe])[0]
        # HF's Metaspace pre-tokenizer leaves the dummy "▁" out when a text starts with a
        # space; sentencepiece, which Mistral's and LLaMA's own tokenizers run, does not:
        # "  Two" is "▁▁▁Two" there and "▁▁Two" here, which decodes with one space less
        # (measured with Mistral's tokenizer.model.v1, legacy true and false alike). Such
        # texts are encoded as sentencepiece does: a space, then the text, as continuation.
        self._space_led_as_continuation = self._dummy_prefix and (
            self._encode(["first"], [" " + probe])[0] != self._encode_cont_sentinel(["  " + probe])[0])
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        if self.template == "model":
            self._init_model_template()
        elif self.template in ("llama2", "mistral"):
            if bos is None or eos is None:
                raise ChatFormatError(f"template {self.template!r} needs bos and eos tokens; the tokenizer has bos={bos} eos={eos}")
            self._eot = [eos]
            self.stop_token_ids = [eos]
        else:  # chatml
            self._im_start = self._special_id("<|im_start|>")
            self._im_end = self._special_id("<|im_end|>")
            self._eot = [self._im_end] + self._encode_cont(["\n"])[0]
            self.stop_token_ids = _unique([self._im_end] + ([eos] if eos is not None else []))

    # ------------------------------------------------------------------ public API

    def user_text(self, example: Any) -> str:
        """The instruction with language names and the source filled in."""
        names = self.data_cfg.language_names
        return self.data_cfg.instruction.format(
            src_lang=language_name(example.src_lang, names),
            tgt_lang=language_name(example.tgt_lang, names),
            source=example.source,
        )

    def prompt_ids(self, example: Any) -> list[int]:
        return self.prompt_ids_batch([example])[0]

    def prompt_ids_batch(self, examples: Sequence[Any]) -> list[list[int]]:
        return self.user_prompt_ids_batch([self.user_text(ex) for ex in examples])

    def user_prompt_ids_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Like prompt_ids, for a user turn that holds `text` as it is (not the instruction)."""
        return self._assemble([self._prompt_parts(text) for text in texts])

    def answer_ids(self, text: str, *, continuation: bool) -> list[int]:
        return self.answer_ids_batch([text], continuation=continuation)[0]

    def answer_ids_batch(self, texts: Sequence[str], *, continuation: bool) -> list[list[int]]:
        if continuation:
            return self._encode_cont(list(texts))
        if self.template == "model":
            return self._encode_cont([self._answer_lead + t for t in texts])
        if self.template == "llama2":  # "[/INST] {answer}": the answer follows a space
            return self._encode_cont([" " + t for t in texts])
        if self.template == "mistral":  # encoded on its own, like Mistral's tokenizer does
            return self._encode(["first"] * len(texts), list(texts))
        return self._encode_cont(list(texts))  # chatml: right after "assistant\n"

    def end_of_turn_ids(self) -> list[int]:
        return list(self._eot)

    def followup_ids(self, user_text: str) -> list[int]:
        if self.template == "model":
            rendered = self._render(self._followup_messages(user_text), add_generation_prompt=True)
            if not rendered.startswith(self._closed_turn):
                raise ChatFormatError("the model's chat template renders earlier turns differently once a new user turn follows")
            return self._assemble([[("raw_cont", rendered[len(self._closed_turn):])]])[0]
        if self.template == "llama2":
            parts: list[Part] = [self.tokenizer.bos_token_id, ("first", f"[INST] {user_text} [/INST]")]
        elif self.template == "mistral":
            parts = [("first", f"[INST] {user_text} [/INST]")]
        else:
            parts = [self._im_start, ("cont", f"user\n{user_text}"), self._im_end, ("cont", "\n"),
                     self._im_start, ("cont", "assistant\n")]
        return self._assemble([parts])[0]

    def decode_answer(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        stops = set(self.stop_token_ids)
        for i, tok in enumerate(ids):
            if tok in stops:
                ids = ids[:i]
                break
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    # ------------------------------------------------------------------ templates

    def _prompt_parts(self, user: str) -> list[Part]:
        system = self.data_cfg.system_prompt
        if self.template == "model":
            before, lead, after = self._prompt_frame
            return [("raw", before), ("cont", lead + user), ("raw_cont", after)]
        if self.template == "llama2":
            if system:
                user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
            return [self.tokenizer.bos_token_id, ("first", f"[INST] {user} [/INST]")]
        if self.template == "mistral":
            if system:
                user = f"{system}\n\n{user}"
            return [self.tokenizer.bos_token_id, ("first", f"[INST] {user} [/INST]")]
        parts: list[Part] = []
        if system:
            parts += [self._im_start, ("cont", f"system\n{system}"), self._im_end, ("cont", "\n")]
        parts += [self._im_start, ("cont", f"user\n{user}"), self._im_end, ("cont", "\n"),
                  self._im_start, ("cont", "assistant\n")]
        return parts

    def _messages(self, user: str) -> list[dict[str, str]]:
        msgs = []
        if self.data_cfg.system_prompt:
            msgs.append({"role": "system", "content": self.data_cfg.system_prompt})
        msgs.append({"role": "user", "content": user})
        return msgs

    def _followup_messages(self, user_text: str) -> list[dict[str, str]]:
        return self._messages(_USER_SENTINEL) + [
            {"role": "assistant", "content": _ANSWER_SENTINEL},
            {"role": "user", "content": user_text},
        ]

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _init_model_template(self) -> None:
        """Learn from renderings of the model's template where user text and answers go.

            render(user=U, generation prompt)    = P = before + U + after
            render(user=U, assistant=A)          = P + lead + A + post
            render(..., next user, gen prompt)   = P + lead + A + post + next turn

        The template is rendered once here, not per example (fast), and the user text
        is encoded with special-token strings kept as text.
        """
        user = self._messages(_USER_SENTINEL)
        prompt = self._render(user, add_generation_prompt=True)
        if prompt.count(_USER_SENTINEL) != 1:
            raise ChatFormatError(
                "the model's chat template does not show the user text once in the prompt; "
                f"set model.chat_template to one of {', '.join(TEMPLATES)}"
            )
        before, after = prompt.split(_USER_SENTINEL)
        # Whitespace in front of the user text belongs to it ("[INST] {user}": the
        # space becomes sentencepiece's "▁" on the user text's first piece).
        stripped = before.rstrip()
        self._prompt_frame = (stripped, before[len(stripped):], after)
        full = self._render(user + [{"role": "assistant", "content": _ANSWER_SENTINEL}], add_generation_prompt=False)
        if not full.startswith(prompt) or _ANSWER_SENTINEL not in full[len(prompt):]:
            raise ChatFormatError(
                "the model's chat template does not render an answer after its generation prompt; "
                f"set model.chat_template to one of {', '.join(TEMPLATES)}"
            )
        rest = full[len(prompt):]
        at = rest.index(_ANSWER_SENTINEL)
        # Spaces before the answer join its first word (LLaMA-2's "[/INST] {answer}");
        # anything else a template writes before every answer (newlines, an empty
        # "<think></think>") belongs to the prompt, not to the translation span.
        lead = rest[:at]
        core = lead.rstrip(" ")
        self._answer_lead = lead[len(core):]
        if core:
            before, ws, after = self._prompt_frame
            self._prompt_frame = (before, ws, after + core)
        post = rest[at + len(_ANSWER_SENTINEL):]
        self._closed_turn = full
        self._eot = self._assemble([[("raw_cont", post)]])[0]
        if not self._eot:
            raise ChatFormatError("the model's chat template closes an assistant turn with no tokens; set model.chat_template")
        specials = set(self.tokenizer.all_special_ids)
        eos = self.tokenizer.eos_token_id
        self.stop_token_ids = _unique([i for i in self._eot if i in specials] + ([eos] if eos is not None else []))

    # ------------------------------------------------------------------ encoding

    def _special_id(self, token: str) -> int:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == self.tokenizer.unk_token_id:
            raise ChatFormatError(f"template {self.template!r} needs the token {token!r}, which the tokenizer does not have")
        return tid

    def _encode(self, modes: Sequence[str], texts: Sequence[str]) -> list[list[int]]:
        """Encode texts as strings of their own; "raw" texts keep special-token strings.

        Equal texts (the template frame around every prompt) are encoded once.
        """
        out: list[list[int]] = [[] for _ in texts]
        space_led = getattr(self, "_space_led_as_continuation", False)
        for split in (True, False):
            idx = [i for i, m in enumerate(modes) if (m != "raw") == split]
            led = [i for i in idx if space_led and texts[i].startswith(" ")]  # see __init__
            if led:
                for i, ids in zip(led, self._encode_cont_sentinel([" " + texts[i] for i in led], raw=not split)):
                    out[i] = ids
                idx = [i for i in idx if not texts[i].startswith(" ")]
            if not idx:
                continue
            unique = list(dict.fromkeys(texts[i] for i in idx))
            ids_of = dict(zip(unique, self._tokenize(unique, split_special=split)))
            for i in idx:
                out[i] = list(ids_of[texts[i]])
        return out

    def _tokenize(self, texts: list[str], split_special: bool) -> list[list[int]]:
        """One batched tokenizer call, no special tokens added.

        Fast tokenizers go straight to the Rust backend's `encode_batch_fast` (no
        offsets, no per-encoding Python conversion: ~2x faster on 14k pairs); the
        result is the same as `tokenizer(texts, add_special_tokens=False,
        split_special_tokens=...)`, which slow tokenizers use.
        """
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and hasattr(backend, "encode_batch_fast") and hasattr(backend, "encode_special_tokens"):
            before = backend.encode_special_tokens
            backend.encode_special_tokens = split_special
            try:
                return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
            finally:
                backend.encode_special_tokens = before
        return self.tokenizer(texts, add_special_tokens=False, split_special_tokens=split_special)["input_ids"]

    def _encode_cont(self, texts: list[str], raw: bool = False) -> list[list[int]]:
        if not texts:
            return []
        if not getattr(self, "_dummy_prefix", False):
            return self._encode(["raw" if raw else "first"] * len(texts), texts)
        return self._encode_cont_sentinel(texts, raw)

    def _encode_cont_sentinel(self, texts: list[str], raw: bool = False) -> list[list[int]]:
        n = len(self._sentinel_ids)
        mode = "raw" if raw else "first"
        encoded = self._encode([mode] * len(texts), [_CONT_SENTINEL + t for t in texts])
        out = []
        for text, ids in zip(texts, encoded):
            if ids[:n] != self._sentinel_ids:
                raise ChatFormatError(
                    f"cannot encode {text[:40]!r} as continuation text: the tokenizer merges it with the "
                    f"sentinel {_CONT_SENTINEL!r} ({ids[:n + 2]} vs {self._sentinel_ids})"
                )
            out.append(ids[n:])
        return out

    def _assemble(self, parts_lists: Sequence[Sequence[Part]]) -> list[list[int]]:
        """Token ids of many part lists, with one batched tokenizer call per mode."""
        by_mode: dict[str, list[tuple[int, int, str]]] = {}
        for r, parts in enumerate(parts_lists):
            for c, part in enumerate(parts):
                if not isinstance(part, int):
                    by_mode.setdefault(part[0], []).append((r, c, part[1]))
        encoded: dict[tuple[int, int], list[int]] = {}
        for mode, items in by_mode.items():
            texts = [t for _, _, t in items]
            if mode == "cont":
                ids = self._encode_cont(texts)
            elif mode == "raw_cont":
                ids = self._encode_cont(texts, raw=True)
            else:
                ids = self._encode([mode] * len(texts), texts)
            for (r, c, _), one in zip(items, ids):
                encoded[(r, c)] = one
        out = []
        for r, parts in enumerate(parts_lists):
            row: list[int] = []
            for c, part in enumerate(parts):
                if isinstance(part, int):
                    row.append(part)
                else:
                    row.extend(encoded[(r, c)])
            out.append(row)
        return out

    @staticmethod
    def _check_instruction(instruction: str) -> None:
        try:
            instruction.format(src_lang="A", tgt_lang="B", source="S")
        except (KeyError, IndexError, ValueError) as err:
            raise ChatFormatError(
                f"data.instruction {instruction!r}: {err!r}; the placeholders are {{src_lang}}, {{tgt_lang}}, {{source}} "
                "(write literal braces as {{ and }})"
            ) from None
        if "{source}" not in instruction:
            raise ChatFormatError(f"data.instruction {instruction!r} must contain {{source}}")


def resolve_template(tokenizer: Any, template: str = "auto") -> str:
    """The template a ChatFormat uses: "model", "llama2", "mistral" or "chatml"."""
    has_own = bool(getattr(tokenizer, "chat_template", None))
    if template in TEMPLATES:
        return template
    if template == "model":
        if not has_own:
            raise ChatFormatError(f"model.chat_template=model but the tokenizer has no chat template; use one of {', '.join(TEMPLATES)}")
        return "model"
    if template != "auto":
        raise ChatFormatError(f"unknown chat template {template!r}: expected auto, model, {', '.join(TEMPLATES)}")
    if has_own:
        return "model"
    if "<|im_start|>" in tokenizer.get_vocab():
        return "chatml"
    name = str(getattr(tokenizer, "name_or_path", "")).lower().replace("_", "-")
    if "mistral" in name or "mixtral" in name:
        return "mistral"
    if "llama-2" in name or "llama2" in name:
        return "llama2"
    raise ChatFormatError(
        f"model has no chat template (tokenizer {getattr(tokenizer, 'name_or_path', '?')!r}); "
        f"set model.chat_template to one of {', '.join(TEMPLATES)}"
    )


def template_identity(tokenizer: Any, template: str) -> str:
    """What decides the prompt's layout: a built-in template's name, or for "model" (the
    tokenizer's own Jinja template) a hash of that template's text, which the tokenizer
    fingerprint does not see (another default system prompt, another turn marker)."""
    if template != "model":
        return template
    text = json.dumps(getattr(tokenizer, "chat_template", None), sort_keys=True)
    return "model:" + hashlib.sha1(text.encode()).hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash that changes when a tokenizer would encode text differently.

    Covers the vocabulary size, the special tokens and their ids, and the encoding of
    a multilingual probe string (Latin, Cyrillic, CJK, emoji, newlines, a "</s>").
    Recorded rationale token ids are reused only under an equal fingerprint.
    """
    probe = "Hello, world! Grüße — привет 你好 😀\n\n  x</s><|im_end|>[INST] 123"
    specials = sorted((str(k), str(v)) for k, v in tokenizer.special_tokens_map.items())
    data = {
        "vocab": len(tokenizer),
        "specials": specials,
        "special_ids": sorted(int(i) for i in tokenizer.all_special_ids),
        "probe": list(tokenizer(probe, add_special_tokens=False)["input_ids"]),
        "probe_with_specials": list(tokenizer(probe)["input_ids"]),
    }
    return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _unique(ids: list[int]) -> list[int]:
    return list(dict.fromkeys(int(i) for i in ids))

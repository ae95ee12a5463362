"""Language codes (ISO 639-1, a few ISO 639-3) and the English names used in prompts.

The instruction template (`data.instruction`) says "from {src_lang} into {tgt_lang}"
with *names*, because chat models follow "from German into English" better than
"from de into en". Codes are matched case-insensitively; a region or script suffix
after "_" is ignored for the lookup ("zh_Hans" -> Chinese, "pt_BR" -> Portuguese).

An unknown code is an error, not a silent fallback to the code itself (a prompt saying
"Translate from xx into en" would quietly degrade every example). Pass the name in the
config instead:

    data:
      language_names: {ga: Irish}
"""
from __future__ import annotations

from collections.abc import Mapping

LANGUAGE_NAMES: dict[str, str] = {
    "ar": "Arabic",
    "bg": "Bulgarian",
    "bn": "Bengali",
    "ca": "Catalan",
    "cs": "Czech",
    "da": "Danish",
    "de": "German",
    "el": "Greek",
    "en": "English",
    "es": "Spanish",
    "et": "Estonian",
    "fa": "Persian",
    "fi": "Finnish",
    "fr": "French",
    "gu": "Gujarati",
    "ha": "Hausa",
    "he": "Hebrew",
    "hi": "Hindi",
    "hr": "Croatian",
    "hu": "Hungarian",
    "id": "Indonesian",
    "is": "Icelandic",
    "it": "Italian",
    "ja": "Japanese",
    "kk": "Kazakh",
    "km": "Khmer",
    "ko": "Korean",
    "lt": "Lithuanian",
    "lv": "Latvian",
    "ms": "Malay",
    "nl": "Dutch",
    "no": "Norwegian",
    "pl": "Polish",
    "ps": "Pashto",
    "pt": "Portuguese",
    "ro": "Romanian",
    "ru": "Russian",
    "sk": "Slovak",
    "sl": "Slovenian",
    "sr": "Serbian",
    "sv": "Swedish",
    "sw": "Swahili",
    "ta": "Tamil",
    "th": "Thai",
    "tr": "Turkish",
    "uk": "Ukrainian",
    "ur": "Urdu",
    "vi": "Vietnamese",
    "xh": "Xhosa",
    "zh": "Chinese",
    "zu": "Zulu",
    # ISO 639-3 codes seen in MT corpora
    "hrv": "Croatian",
    "liv": "Livonian",
    "sah": "Yakut",
}


class UnknownLanguageError(KeyError):
    """A language code with no known English name."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


def language_name(code: str, extra: Mapping[str, str] | None = None) -> str:
    """English name of a language code, e.g. "de" -> "German".

    `extra` (the config's `data.language_names`) is consulted first, so a project can
    add codes or rename known ones. Raises UnknownLanguageError for unknown codes.
    """
    if extra:
        if code in extra:
            return extra[code]
        lowered = {k.lower(): v for k, v in extra.items()}
        if code.lower() in lowered:
            return lowered[code.lower()]
    key = code.lower()
    if key in LANGUAGE_NAMES:
        return LANGUAGE_NAMES[key]
    base = key.split("_", 1)[0]
    if base in LANGUAGE_NAMES:
        return LANGUAGE_NAMES[base]
    raise UnknownLanguageError(
        f"unknown language code {code!r}: give its English name in the config, "
        f"e.g. `data.language_names: {{{code}: <Name>}}` "
        f"(known codes: {', '.join(sorted(LANGUAGE_NAMES))})"
    )


def is_language_code(text: str) -> bool:
    """True for strings shaped like a language code ("de", "zh", "hrv", "pt_BR")."""
    base = text.split("_", 1)[0]
    return 2 <= len(base) <= 3 and base.isascii() and base.isalpha() and base.islower()

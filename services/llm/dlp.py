"""Personal-data detection (DLP) with Presidio, offline and without a language model.

Presidio's pattern recognizers validate what they match (Luhn for cards, mod-97 for IBANs, the
ISO 7064 check digit of a German tax id, libphonenumber for phone numbers), so a random number
is not taken for an account. Presidio has nothing for a BIC next to an account number, a
passport number named as one, a date of birth or a postal address; the recognizers for those are
here. Without an NLP model Presidio cannot use context words, so these name their context in
the pattern itself ("born 12.03.1984", "passport no. C01X00T47").

The router runs :meth:`Scanner.scan` over the question, every conversation turn and the exact
prompt about to be sent to the cloud; a finding at or above ``min_score`` keeps the request on
the premises. Findings carry the entity type and where it is, never the matched text outside
this process.
"""

from __future__ import annotations

import base64
import re
import threading
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from presidio_analyzer import AnalyzerEngine, EntityRecognizer, Pattern, PatternRecognizer, RecognizerRegistry
from presidio_analyzer.nlp_engine import NoOpNlpEngine
from presidio_analyzer.predefined_recognizers import (
    CreditCardRecognizer,
    DeIdCardRecognizer,
    DePassportRecognizer,
    DeSocialSecurityRecognizer,
    DeTaxIdRecognizer,
    EmailRecognizer,
    IbanRecognizer,
    PhoneRecognizer,
    UkNinoRecognizer,
    UsSsnRecognizer,
)

from services.config import DLP_ENTITIES
from services.kb.cleaning import DASHES, INVISIBLE

LANGUAGE: Final = "en"
"""Every recognizer is registered under one language and the text is analysed once: the patterns
do not depend on the language (German context words are part of the German ones)."""

_COUNTRIES: Final = (
    "AD AE AF AG AI AL AM AO AR AT AU AW AZ BA BB BD BE BF BG BH BI BJ BM BN BO BR BS BT BW BY BZ CA "
    "CD CF CG CH CI CL CM CN CO CR CU CV CW CY CZ DE DJ DK DM DO DZ EC EE EG ER ES ET FI FJ FO FR GA "
    "GB GD GE GG GH GI GL GM GN GQ GR GT GW GY HK HN HR HT HU ID IE IL IM IN IQ IR IS IT JE JM JO JP "
    "KE KG KH KM KN KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MG MK ML MM MN MO MR MT "
    "MU MV MW MX MY MZ NA NE NG NI NL NO NP NZ OM PA PE PG PH PK PL PR PS PT PY QA RO RS RU RW SA SB "
    "SC SD SE SG SI SK SL SM SN SO SR SS ST SV SY SZ TD TG TH TJ TL TM TN TO TR TT TW TZ UA UG US UY "
    "UZ VA VC VE VG VN VU WS XK YE ZA ZM ZW"
)
_BIC = rf"\b[A-Z]{{4}}(?:{'|'.join(_COUNTRIES.split())})[A-Z0-9]{{2}}(?:[A-Z0-9]{{3}})?\b"
_ACCOUNT = r"\b\d{6,12}\b"
_DATE = (
    r"(?:\d{1,2}[./-]\d{1,2}[./-](?:19|20)\d{2}|(?:19|20)\d{2}-\d{2}-\d{2}"
    r"|\d{1,2}\.?\s+(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec|mär|mai|okt|dez)[a-zä]*\.?\s+(?:19|20)\d{2})"
)
_STREET_DE = r"(?:stra(?:ß|ss)e|str\.|weg|platz|allee|gasse|ring|damm|ufer)"
_STREET_EN = r"(?:street|st\.|road|rd\.|avenue|ave\.|lane|ln\.|drive|dr\.|boulevard|blvd\.|way|court|place)"


class BicAccountRecognizer(PatternRecognizer):
    """A BIC (SWIFT code, with a real country code) with an account number within 60 characters
    on the same line, in either order: the pair identifies an account."""

    def __init__(self) -> None:
        super().__init__(
            supported_entity="BIC_ACCOUNT",
            supported_language=LANGUAGE,
            patterns=[
                Pattern("BIC then account", rf"{_BIC}[^\n]{{0,60}}?{_ACCOUNT}", 0.7),
                Pattern("account then BIC", rf"{_ACCOUNT}[^\n]{{0,60}}?{_BIC}", 0.7),
            ],
        )


class PassportRecognizer(PatternRecognizer):
    """A document number that the text calls a passport (or ID card) number."""

    def __init__(self) -> None:
        words = r"(?:passport|reisepass|passnummer|pass-nr\.?|passeport|pasaporte|ausweis(?:nummer)?|id card)"
        number = r"(?=[A-Z0-9]*\d)[A-Z0-9]{6,10}\b"
        super().__init__(
            supported_entity="PASSPORT",
            supported_language=LANGUAGE,
            patterns=[
                Pattern("passport number", rf"(?i:{words})(?:\s*(?:no\.?|number|nr\.?|#|:))*\s*{number}", 0.7)
            ],
        )


class DateOfBirthRecognizer(PatternRecognizer):
    """A date the text says someone was born on."""

    def __init__(self) -> None:
        words = r"(?:born(?: on)?|date of birth|d\.?o\.?b\.?|birthday|geb\.|geboren(?: am)?|geburtsdatum)"
        super().__init__(
            supported_entity="DATE_OF_BIRTH",
            supported_language=LANGUAGE,
            patterns=[Pattern("birth date", rf"(?i:{words})\s*[:,]?\s*(?i:{_DATE})", 0.7)],
        )


class PostalAddressRecognizer(PatternRecognizer):
    """A street with a house number and, for German addresses, a five-digit postcode and town."""

    def __init__(self) -> None:
        de = rf"\b[A-ZÄÖÜ][a-zäöüß-]+(?i:{_STREET_DE})\s+\d{{1,4}}[a-z]?,?\s+\d{{5}}\s+[A-ZÄÖÜ][a-zäöüß]+"
        en = rf"\b\d{{1,5}}\s+(?:[A-Z][a-z]+\s+){{1,3}}(?i:{_STREET_EN})(?=[\s,.]|$)"
        super().__init__(
            supported_entity="POSTAL_ADDRESS",
            supported_language=LANGUAGE,
            patterns=[Pattern("German address", de, 0.6), Pattern("English street address", en, 0.5)],
        )


class AnyDomainEmailRecognizer(EmailRecognizer):
    """Presidio's e-mail pattern without its domain check: that check downloads the public suffix
    list (no network here) and drops addresses at unlisted domains (``.example``, ``.corp``,
    ``.internal``), which are personal data all the same."""

    def __init__(self) -> None:
        super().__init__(supported_language=LANGUAGE)

    def validate_result(self, pattern_text: str) -> bool:
        return True


def recognizers() -> list[EntityRecognizer]:
    """Every recognizer the scanner can use."""
    return [
        CreditCardRecognizer(supported_language=LANGUAGE),
        IbanRecognizer(supported_language=LANGUAGE),
        AnyDomainEmailRecognizer(),
        PhoneRecognizer(supported_language=LANGUAGE, supported_regions=("DE", "AT", "CH", "GB", "US", "FR")),
        UsSsnRecognizer(supported_language=LANGUAGE),
        UkNinoRecognizer(supported_language=LANGUAGE),
        DeTaxIdRecognizer(supported_language=LANGUAGE),
        DePassportRecognizer(supported_language=LANGUAGE),
        DeIdCardRecognizer(supported_language=LANGUAGE),
        DeSocialSecurityRecognizer(supported_language=LANGUAGE),
        BicAccountRecognizer(),
        PassportRecognizer(),
        DateOfBirthRecognizer(),
        PostalAddressRecognizer(),
    ]


_INVISIBLE = dict.fromkeys(map(ord, INVISIBLE))
_HEX = re.compile(r"(?<![0-9A-Fa-f])(?:[0-9A-Fa-f]{2}){16,}(?![0-9A-Fa-f])")


_DASHES = dict.fromkeys(map(ord, DASHES), "-")


def normalise(text: str) -> str:
    """``text`` as a reader sees it: compatibility forms folded (fullwidth digits and at signs,
    no-break and thin spaces), dashes as hyphens, invisible characters removed, so they cannot
    split what the recognizers look for."""
    return unicodedata.normalize("NFKC", text).translate(_INVISIBLE).translate(_DASHES)


_BLOB = re.compile(r"(?<![A-Za-z0-9+/=_-])[A-Za-z0-9+/_-]{20,}={0,2}(?![A-Za-z0-9+/=_-])")


@dataclass(frozen=True, slots=True)
class Decoded:
    """What base64 blobs in a text hide: their decoded text, and whether one decoded to
    something that is not text (which nothing can screen)."""

    texts: list[str]
    opaque: bool


def decode_blobs(text: str) -> Decoded:
    """Base64 (standard or URL-safe) and hex inside ``text``, decoded, so content cannot slip past the
    screening encoded. A run counts as base64 only when it mixes upper case, lower case and
    digits, as encoded text does and words, hex ids and hashes do not."""
    texts: list[str] = []
    opaque = False
    for match in _BLOB.finditer(text):
        blob = match.group()
        if not (
            any(c.isupper() for c in blob)
            and any(c.islower() for c in blob)
            and any(c.isdigit() for c in blob)
        ):
            continue
        bare = blob.rstrip("=")
        padded = bare + "=" * (-len(bare) % 4)
        try:
            raw = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
            decoded = raw.decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            opaque = True
            continue
        printable = sum(ch.isprintable() or ch.isspace() for ch in decoded)
        if decoded and printable / len(decoded) >= 0.9:
            texts.append(decoded)
        else:
            opaque = True
    for match in _HEX.finditer(text):  # hex that spells text (hashes and ids do not)
        try:
            decoded = bytes.fromhex(match.group()).decode("utf-8")
        except ValueError:
            continue
        if sum(ch.isprintable() or ch.isspace() for ch in decoded) / len(decoded) >= 0.9:
            texts.append(decoded)
    return Decoded(texts, opaque)


@dataclass(frozen=True, slots=True)
class Finding:
    entity: str
    start: int
    end: int
    score: float


class Scanner:
    """One Presidio analyzer, shared by every request (analysis is thread-safe once built)."""

    def __init__(
        self,
        entities: Sequence[str] = DLP_ENTITIES,
        min_score: float = 0.4,
        custom_patterns: dict[str, str] | None = None,
        allow: Sequence[str] = (),
    ) -> None:
        registry = RecognizerRegistry(supported_languages=[LANGUAGE])
        for recognizer in recognizers():
            registry.add_recognizer(recognizer)
        for name, regex in (custom_patterns or {}).items():
            registry.add_recognizer(
                PatternRecognizer(
                    supported_entity=name.upper(),
                    supported_language=LANGUAGE,
                    patterns=[Pattern(name, regex, 1.0)],
                )
            )
        self.entities = [*entities, *(n.upper() for n in custom_patterns or {})]
        self.min_score = min_score
        self.allow = list(allow)
        nlp = NoOpNlpEngine(models=[{"lang_code": LANGUAGE, "model_name": "no_op"}])
        self._engine = AnalyzerEngine(registry=registry, nlp_engine=nlp, supported_languages=[LANGUAGE])
        self._lock = threading.Lock()

    def scan(self, text: str) -> list[Finding]:
        """Findings at or above ``min_score``, most specific (highest score) first."""
        text = normalise(text)
        if not text.strip():
            return []
        results = self._engine.analyze(
            text=text,
            language=LANGUAGE,
            entities=self.entities,
            score_threshold=self.min_score,
            allow_list=self.allow or None,
            allow_list_match="exact",
        )
        return sorted(
            (Finding(r.entity_type, r.start, r.end, r.score) for r in results),
            key=lambda f: (-f.score, f.start),
        )

    def first(self, text: str) -> str | None:
        """The entity type of the strongest finding in ``text``, or None."""
        found = self.scan(text)
        return found[0].entity if found else None

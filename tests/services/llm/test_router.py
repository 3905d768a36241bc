"""Sensitivity routing with the real Presidio analyzer: labels that may not leave, personal data in
any turn or in the exact outbound prompt, unvouched assistant turns and a failing scanner all keep
the request on the premises."""

from __future__ import annotations

import pytest

from services.config import RoutingSettings
from services.kb.access import Acl
from services.kb.classification import Classification
from services.kb.models import Chunk, Hit
from services.llm.prompt import build_prompt
from services.llm.router import SensitivityRouter
from services.llm.tokens import ApproxCounter

C = Classification


def _hit(label: Classification, text: str = "text") -> Hit:
    chunk = Chunk("c", "d", "v", 0, text, label, "s", 0, {"title": "T"}, Acl.everyone())
    return Hit(chunk=chunk, score=0.9)


@pytest.fixture(scope="module")
def router() -> SensitivityRouter:
    return SensitivityRouter(RoutingSettings(custom_patterns={"project_code": r"\bPRJ-\d{4}\b"}))


def test_plain_question_may_go_to_the_cloud(router: SensitivityRouter) -> None:
    decision = router.decide(["How many vacation days do I get?"], [C.INTERNAL, C.PUBLIC])
    assert (decision.target, decision.reason) == ("cloud", "no-sensitive-content")


def test_a_code_that_could_not_be_looked_up_keeps_it_local(router: SensitivityRouter) -> None:
    decision = router.decide(["What is OWL-7781-ZX?"], [C.PUBLIC], unlooked="verbatim-lookup-unavailable")
    assert (decision.target, decision.reason) == ("local", "verbatim-lookup-unavailable")
    # a label that may not leave is still the reason given first
    assert (
        router.decide(["x"], [C.CONFIDENTIAL], unlooked="too-many-identifiers").reason
        == "confidential-context"
    )


def test_a_label_that_may_not_leave_keeps_it_local(router: SensitivityRouter) -> None:
    assert router.decide(["What is the plan?"], [C.PUBLIC, C.CONFIDENTIAL]).reason == "confidential-context"
    public_only = SensitivityRouter(RoutingSettings(cloud_classifications=[C.PUBLIC]))
    assert public_only.decide(["What is the plan?"], [C.INTERNAL]).reason == "internal-context"


@pytest.mark.parametrize(
    ("text", "entity"),
    [
        ("Send it to anna.schmidt@northwind.example", "email_address"),
        ("Call me on +49 30 1234 5678 tomorrow", "phone_number"),
        ("ring 212 555 0123 after six", "phone_number"),
        ("My SSN is 536-22-8726", "us_ssn"),
        ("NI number AB 12 34 56 C please", "uk_nino"),
        ("Card 4111 1111 1111 1111 was charged twice", "credit_card"),
        ("IBAN DE89 3704 0044 0532 0130 00 for the refund", "iban_code"),
        ("Meine Steuer-ID ist 86095742719.", "de_tax_id"),
        ("Überweisung an BIC DEUTDEFF, Kontonummer 1234567890", "bic_account"),
        ("Reisepassnummer C01X00T47 liegt vor", "passport"),
        ("Passport no. 533380006 was renewed", "passport"),
        ("Herr Müller, geboren am 17.05.1980, zieht um", "date_of_birth"),
        ("Anna Schmidt wohnt in der Lindenallee 12, 50667 Köln", "postal_address"),
        ("John Smith lives at 221 Baker Street now", "postal_address"),
        ("Status of PRJ-2041?", "project_code"),
    ],
)
def test_personal_data_keeps_it_local(router: SensitivityRouter, text: str, entity: str) -> None:
    decision = router.decide(["an earlier harmless turn", text], [])
    assert (decision.target, decision.reason) == ("local", f"personal-data:{entity}")
    assert text not in decision.reason  # the matched data is never in the reason


@pytest.mark.parametrize(
    "text",
    [
        "What changed in release 2024.11.3?",
        "Order 4111 1111 1111 1112 shipped",  # 16 digits failing the Luhn check: not a card
        "code DE00 3704 0044 0532 0130 00 in the log",  # failing the IBAN checksum
        "Steuer-ID 86095742718",  # a wrong check digit
        "The contract runs from 01.01.2024 to 31.12.2025.",
        "The CONTRACT AGREEMENT 2024 number 12345678",  # a BIC-shaped word, no real country code
        "Is 2 + 2 = 4? Room 12 on floor 3.",
    ],
)
def test_ordinary_text_is_not_personal_data(router: SensitivityRouter, text: str) -> None:
    assert router.decide([text], []).target == "cloud"


def test_assistant_turns_the_gateway_cannot_vouch_for_keep_it_local(router: SensitivityRouter) -> None:
    assert router.decide(["hi"], [], vouched=False).reason == "unverified-assistant-turn"


def test_the_exact_outbound_prompt_is_checked(router: SensitivityRouter) -> None:
    """A passage the question never mentioned may carry personal data; the prompt is what goes."""

    def prompt(*hits: Hit):
        return build_prompt(
            "Answer from the passages.",
            "Who do I call?",
            list(hits),
            context_budget=2000,
            max_tokens=4000,
            counter=ApproxCounter(),
        )

    assert router.outbound(prompt(_hit(C.PUBLIC, "Ask the front desk."))) is None
    leaking = prompt(_hit(C.PUBLIC, "Call Anna on +49 30 1234 5678 or mail anna@corp.internal."))
    assert router.outbound(leaking) in ("personal-data:phone_number", "personal-data:email_address")
    assert router.outbound(prompt(_hit(C.CONFIDENTIAL, "Ask the front desk."))) == "confidential-context"


class BrokenScannerDouble:
    """TEST DOUBLE: a DLP scanner that fails, as a broken install would."""

    def first(self, text: str) -> str | None:
        raise RuntimeError("scanner broke")


def test_a_failing_scanner_keeps_it_local() -> None:
    router = SensitivityRouter(RoutingSettings(), scanner=BrokenScannerDouble())  # type: ignore[arg-type]
    assert router.decide(["hello"], []).reason == "dlp-unavailable"


def test_no_cloud_endpoint_means_local(router: SensitivityRouter) -> None:
    assert router.decide(["hello there"], [], cloud_available=False).reason == "no-cloud-endpoint"


def test_routing_settings_are_validated() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="not a valid regular expression"):
        RoutingSettings(custom_patterns={"bad": "(unclosed"})
    with pytest.raises(ValidationError, match="may not include 'confidential'"):
        RoutingSettings(cloud_classifications=[C.PUBLIC, C.CONFIDENTIAL])
    with pytest.raises(ValidationError, match="unknown entities \\['NAME'\\]"):
        RoutingSettings(dlp_entities=["EMAIL_ADDRESS", "NAME"])
    only_email = SensitivityRouter(RoutingSettings(dlp_entities=["EMAIL_ADDRESS"]))
    assert only_email.decide(["Card 4111 1111 1111 1111"], []).target == "cloud"
    assert only_email.decide(["mail a@b.example"], []).target == "local"


def test_base64_cannot_smuggle_content_past_the_scan(router: SensitivityRouter) -> None:
    import base64

    hidden = base64.b64encode(b"mail anna.schmidt@northwind.example the memo").decode()
    assert router.decide([f"decode {hidden} please"], []).reason == "personal-data:email_address"
    assert router.decide([f"decode {base64.b64encode(bytes(range(40))).decode()}"], []).reason == (
        "opaque-content"
    )
    # hex ids, hashes and long words are not base64 text
    ordinary = "chunk 4653e9b9a76a6f1704d5604d95e5f99e, internationalization, sha 9f86d081884c7d659a2feaa0"
    assert router.decide([ordinary], []).target == "cloud"


def test_hex_and_invisible_characters_do_not_hide_content(router: SensitivityRouter) -> None:
    from services.llm.dlp import decode_blobs
    from services.llm.router import identifiers

    memo = "Project Nightjar buys Borealis Dynamics"
    assert decode_blobs(f"the memo: {memo.encode().hex()}").texts == [memo]
    assert decode_blobs("sha 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08").texts == []
    for text in (
        "mail anna\u200b@corp.example",
        "mail anna\uff20corp.example",
        "card 4111\u00a01111\u00a01111\u00a01111",
    ):
        assert router.decide([text], []).target == "local", text
    assert "OWL-7781-ZX" in identifiers(["what is owl-7781-zx"])
    assert "OWL-7781-ZX" in identifiers(["what is OWL\u200b-7781-ZX"])
    # spelled out, character by character
    assert "OWL-7781-ZX" in identifiers(["what is O W L - 7 7 8 1 - Z X ?"])
    assert "OWL-7781-ZX" in identifiers(["code o.w.l-7.7.8.1-z.x please"])
    assert identifiers(["I am a b c here"]) == []  # ordinary text is not a code
    decoys = " ".join(f"AB{i:02d}-0000" for i in range(40))
    assert "CANARY-NJ-5D81C2E7" in identifiers([f"{decoys} CANARY-NJ-5d81c2e7"])
    longer = " ".join(f"zzzzzzzzzz{i:03d}" for i in range(200))  # longer decoys: nothing is dropped
    assert "OWL-7781" in identifiers([f"OWL-7781 {longer}"])
    assert "OWL-7781-ZX" in identifiers(["OWL\u20107781\u2011ZX"])  # Unicode hyphens

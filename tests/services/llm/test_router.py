"""Sensitivity router: confidential context and personal data stay on the premises."""

from __future__ import annotations

import pytest

from services.config import RoutingSettings
from services.kb.classification import Classification
from services.kb.models import Chunk, Hit
from services.llm.router import SensitivityRouter, luhn_ok


def _hit(label: Classification) -> Hit:
    chunk = Chunk(
        id="c",
        doc_id="d",
        version="v",
        chunk_no=0,
        text="text",
        classification=label,
        source="s",
        page=0,
        metadata={},
    )
    return Hit(chunk=chunk, score=0.9)


@pytest.fixture
def router() -> SensitivityRouter:
    return SensitivityRouter(RoutingSettings(custom_patterns={"project_code": r"\bPRJ-\d{4}\b"}))


def test_plain_question_may_go_to_the_cloud(router: SensitivityRouter) -> None:
    decision = router.decide("How many vacation days do I get?", [_hit(Classification.INTERNAL)])
    assert (decision.target, decision.reason) == ("cloud", "no-sensitive-content")


def test_any_confidential_chunk_keeps_it_local(router: SensitivityRouter) -> None:
    hits = [_hit(Classification.PUBLIC), _hit(Classification.CONFIDENTIAL)]
    assert router.decide("What is the plan?", hits).reason == "confidential-context"


@pytest.mark.parametrize(
    "query, detector",
    [
        ("Send it to anna.schmidt@northwind.example", "email"),
        ("Call me on +49 30 1234 5678 tomorrow", "phone"),
        ("My SSN is 123-45-6789", "national_id"),
        ("NI number AB 12 34 56 C please", "national_id"),
        ("Card 4111 1111 1111 1111 was charged twice", "card_number"),
        ("Status of PRJ-2041?", "project_code"),
    ],
)
def test_personal_data_keeps_it_local(router: SensitivityRouter, query: str, detector: str) -> None:
    decision = router.decide(query, [])
    assert decision.target == "local" and decision.reason == f"personal-data:{detector}"
    assert query not in decision.reason  # the matched data is never in the reason


@pytest.mark.parametrize(
    "query",
    [
        "What changed in release 2024.11.3?",  # dotted version, not a phone number
        "Order 4111 1111 1111 1112 shipped",  # 16 digits failing the Luhn check: not a card
        "Is 2 + 2 = 4?",
        "Room 12 on floor 3",
    ],
)
def test_ordinary_numbers_are_not_personal_data(router: SensitivityRouter, query: str) -> None:
    assert router.decide(query, []).target == "cloud"


def test_detectors_are_configurable() -> None:
    only_email = SensitivityRouter(RoutingSettings(detectors=["email"]))
    assert only_email.decide("Card 4111 1111 1111 1111", []).target == "cloud"
    assert only_email.decide("mail a@b.example", []).target == "local"


def test_no_cloud_endpoint_means_local(router: SensitivityRouter) -> None:
    assert router.decide("hello there", [], cloud_available=False).reason == "no-cloud-endpoint"


def test_luhn() -> None:
    assert luhn_ok("4111111111111111") and luhn_ok("79927398713") and not luhn_ok("79927398710")


def test_routing_settings_are_validated() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="not a valid regular expression"):
        RoutingSettings(custom_patterns={"bad": "(unclosed"})
    with pytest.raises(ValidationError, match="must include 'confidential'"):
        RoutingSettings(local_classifications=[Classification.INTERNAL])


@pytest.mark.parametrize(
    "query, detector",
    [
        ("ring 555 123 4567 after six", "phone"),
        ("ssn 123 45 6789", "national_id"),
        ("ssn 123456789 on file", "national_id"),
        ("IBAN DE89 3704 0044 0532 0130 00 for the refund", "iban"),
    ],
)
def test_more_personal_data_formats(router: SensitivityRouter, query: str, detector: str) -> None:
    assert router.decide(query, []).reason == f"personal-data:{detector}"


def test_iban_needs_a_valid_checksum(router: SensitivityRouter) -> None:
    assert router.decide("code DE00 3704 0044 0532 0130 00 in the log", []).reason != "personal-data:iban"

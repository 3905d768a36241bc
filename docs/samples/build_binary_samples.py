#!/usr/bin/env python3
"""Regenerate the binary sample documents (.docx and .pdf) of the sample corpus.

Why this script exists: Word and PDF files are binary, so changes to them cannot
be reviewed in a diff. The text of both documents therefore lives here, as plain
Python data, and the binary files are generated from it. To change a document,
edit the text below and rerun the script; commit both the script and the
regenerated files.

The output is deterministic: document metadata (creation and modification
dates, author, title) and the timestamps inside the .docx zip container are
fixed, so rerunning the script produces byte-identical files.

Outputs (relative to this script's directory):

* ``policies/information-security-policy.docx`` -- python-docx, with real
  ``Heading 1`` / ``Heading 2`` styles.
* ``policies/travel-and-expense-policy.pdf`` -- fpdf2 (core font Helvetica,
  latin-1 text only), at least three pages, a repeated header line and a
  "Page N of M" footer on every page, and deliberately hyphenated line breaks
  (``reimburse-`` / ``ment``) so that text cleaning can be exercised.

Usage::

    python docs/samples/build_binary_samples.py

Requires ``python-docx`` and ``fpdf2==2.8.9``.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, cast

from docx import Document
from fpdf import FPDF, XPos, YPos

SAMPLES_DIR = Path(__file__).resolve().parent
DOCX_PATH = SAMPLES_DIR / "policies" / "information-security-policy.docx"
PDF_PATH = SAMPLES_DIR / "policies" / "travel-and-expense-policy.pdf"

#: Fixed timestamp used for all document metadata, so output is reproducible.
FIXED_DATE = datetime(2025, 1, 15, 9, 0, 0, tzinfo=UTC)
AUTHOR = "Northwind Robotics GmbH"

BlockKind = Literal["title", "h1", "h2", "p", "bullet", "lines", "table"]
#: A document is a list of blocks. ``lines`` blocks hold text whose line breaks
#: are fixed by hand (used for the hyphenated words in the PDF); ``table``
#: blocks hold a list of rows.
Block = tuple[BlockKind, str | Sequence[str] | Sequence[tuple[str, ...]]]


# --------------------------------------------------------------------------
# Document text: Information Security Policy (.docx)
# --------------------------------------------------------------------------

SECURITY_POLICY: list[Block] = [
    ("title", "Information Security Policy"),
    (
        "p",
        "Northwind Robotics GmbH. Version 3.2, effective 1 February 2025. "
        "Policy owner: Dr. Lena Brandt, Chief Information Security Officer. "
        "Classification: internal.",
    ),
    ("h1", "1. Purpose and Scope"),
    (
        "p",
        "This policy sets out the minimum rules that protect the information and "
        "systems of Northwind Robotics GmbH. It applies to all employees, working "
        "students, interns and contractors who use company accounts, company devices "
        "or company data, wherever they work. Violations may lead to the removal of "
        "access rights and to disciplinary measures. Exceptions to any rule in this "
        "policy must be requested through the security team and approved in writing "
        "by the CISO; an approved exception is valid for at most 12 months.",
    ),
    ("h1", "2. Passwords and Multi-Factor Authentication"),
    ("h2", "2.1 Passwords"),
    (
        "p",
        "Every password for a company account must be at least 14 characters long. "
        "We recommend passphrases made of four or more unrelated words, because they "
        "are long and easy to remember. A password must never be reused across "
        "different services, and company passwords must never be used for private "
        "accounts. Passwords do not expire on a fixed schedule; they must be changed "
        "immediately if there is any suspicion that they have been disclosed.",
    ),
    (
        "p",
        "All employees receive a licence for KeyVault Teams, the company password "
        "manager, and must store work passwords there. Storing passwords in browsers, "
        "spreadsheets, notes or on paper is not allowed. Shared credentials for team "
        "accounts are kept in shared KeyVault collections, never sent by email or chat.",
    ),
    (
        "p",
        "After 10 consecutive failed login attempts, an account is locked for "
        "15 minutes. Repeated lockouts are reported automatically to the security team.",
    ),
    ("h2", "2.2 Multi-Factor Authentication"),
    (
        "p",
        "Multi-factor authentication (MFA) is mandatory for email, the VPN, the source "
        "code platform, the HR and finance systems and every administrator account. "
        "The approved second factors are the Northwind Authenticator app with number "
        "matching and FIDO2 hardware security keys. SMS codes and voice calls are not "
        "accepted as a second factor.",
    ),
    (
        "p",
        "Administrators of production systems and all employees in finance and payroll "
        "must use a FIDO2 hardware key. Each of them receives two keys: one for daily "
        "use and one backup kept in a safe place. A lost security key must be reported "
        "the same working day so it can be revoked.",
    ),
    ("h1", "3. Devices and Encryption"),
    ("h2", "3.1 Full-Disk Encryption"),
    (
        "p",
        "All laptops and desktop computers that store company data must use full-disk "
        "encryption: BitLocker on Windows and FileVault on macOS, in both cases with "
        "XTS-AES 256. Encryption is enabled by IT during setup, and the recovery keys "
        "are escrowed in the device management system. Employees must not disable "
        "encryption or remove a device from device management.",
    ),
    (
        "p",
        "Company mobile phones must use a device PIN of at least six digits and must "
        "be enrolled in device management. Private phones may only be used for email "
        "and chat if the work profile provided by IT is installed.",
    ),
    ("h2", "3.2 Screen Lock, Updates and Removable Media"),
    (
        "p",
        "Screens lock automatically after 5 minutes of inactivity, and employees must "
        "lock their screen manually whenever they leave their device. Security updates "
        "for operating systems and browsers must be installed within 14 days of release; "
        "updates that IT marks as critical must be installed within 72 hours. Devices "
        "that fall more than 30 days behind are blocked from the company network until "
        "they are updated.",
    ),
    (
        "p",
        "USB storage devices are blocked on company laptops. The only exception is the "
        "hardware-encrypted USB drives issued by IT, which are registered to a named "
        "person. Robot firmware images for the test hall are transferred through the "
        "internal artifact repository, not on removable media.",
    ),
    ("h1", "4. Data Classification"),
    (
        "p",
        "All information at Northwind Robotics belongs to one of three classification "
        "levels. The author of a document assigns the level when the document is "
        "created; if no level is assigned, the document is treated as internal. When "
        "documents of different levels are combined, the result takes the highest level.",
    ),
    ("h2", "4.1 Public"),
    (
        "p",
        "Public information has been approved for release outside the company, such as "
        "product brochures, the product FAQ, published press releases and job "
        "advertisements. Only the marketing team and the management board may approve "
        "information for public release. Public information needs no special protection.",
    ),
    ("h2", "4.2 Internal"),
    (
        "p",
        "Internal information is intended for employees and contractors with a valid "
        "contract, for example the employee handbook, runbooks, meeting notes and most "
        "project documentation. It may be shared freely inside the company but must not "
        "be passed to customers, suppliers or other third parties without a signed "
        "non-disclosure agreement.",
    ),
    ("h2", "4.3 Confidential"),
    (
        "p",
        "Confidential information could cause serious harm to the company, its "
        "customers or its employees if disclosed. Examples are customer contracts and "
        "site maps, salary data, health information, unreleased financial results, "
        "merger and acquisition plans, and the source code of the Harbor fleet software. "
        "Confidential information is shared only with named people who need it for "
        "their work. It must be stored in access-restricted locations, sent externally "
        "only with end-to-end encryption and labelled CONFIDENTIAL in the header or file "
        "name. Printed confidential documents must be destroyed in the locked shredding "
        "bins, which meet security level P-4.",
    ),
    ("h1", "5. Reporting Security Incidents"),
    (
        "p",
        "A security incident is any event that may compromise the confidentiality, "
        "integrity or availability of company information, for example a lost or stolen "
        "device, a phishing email that someone clicked on, malware warnings, data sent "
        "to the wrong recipient or unexplained account activity.",
    ),
    (
        "p",
        "Every suspected security incident must be reported within 1 hour of discovery, "
        "by email to security@northwind-robotics.example or by phone to the security "
        "hotline on extension 4499, which is answered around the clock. Report even if "
        "you are not sure whether something is really an incident. Do not try to "
        "investigate on your own, do not delete suspicious emails and do not switch off "
        "an affected device; disconnect it from the network instead.",
    ),
    (
        "p",
        "If personal data may be affected, the security team immediately involves the "
        "Data Protection Officer, Tobias Reinhardt. He decides whether the incident must "
        "be notified to the supervisory authority, which under the GDPR has to happen "
        "within 72 hours of the company becoming aware of it. Nobody reports incidents "
        "to authorities, customers or the press on their own initiative.",
    ),
    ("h1", "6. Access Management and Access Reviews"),
    ("h2", "6.1 Granting and Removing Access"),
    (
        "p",
        "Access is granted on the principle of least privilege: people receive only the "
        "rights they need for their current role. Access requests are submitted through "
        "the IT portal and approved by the owner of the system. When an employee moves "
        "to a new role, rights that are no longer needed are removed within 5 working "
        "days. When an employee leaves the company, all access is revoked by the end of "
        "their last working day.",
    ),
    ("h2", "6.2 Periodic Access Reviews"),
    (
        "p",
        "System owners review who has access to their systems on a fixed schedule. "
        "Systems that hold confidential information are reviewed every quarter, and all "
        "other internal systems every six months. Privileged and administrator accounts "
        "are reviewed every month. The responsible manager must complete each review "
        "within 10 working days of receiving the request; reviews that are not completed "
        "in time are escalated to the CISO, and unconfirmed access is removed.",
    ),
    (
        "p",
        "The results of all access reviews are kept for three years as evidence for "
        "audits. The security team reports the completion rate of access reviews to the "
        "management board twice a year.",
    ),
    ("h1", "7. Contacts"),
    (
        "p",
        "Questions about this policy can be sent to the security team at "
        "security@northwind-robotics.example. For urgent matters, call the security "
        "hotline on extension 4499.",
    ),
]


# --------------------------------------------------------------------------
# Document text: Travel and Expense Policy (.pdf) -- latin-1 only, no em-dashes
# --------------------------------------------------------------------------

PDF_HEADER = "Northwind Robotics - Travel and Expense Policy"

TRAVEL_POLICY: list[Block] = [
    ("title", "Travel and Expense Policy"),
    (
        "p",
        "Northwind Robotics GmbH. Version 2.4, effective 1 January 2025. Policy owner: "
        "Finance department. Classification: internal.",
    ),
    ("h1", "1. Scope and Principles"),
    (
        "p",
        "This policy applies to all business trips and business expenses of employees "
        "of Northwind Robotics GmbH, including trips to customer sites for robot "
        "installations, trade fairs and visits to the Eindhoven office. We expect every "
        "traveller to spend company money as carefully as their own. Travel is only "
        "undertaken when a video call is not a reasonable alternative, and the cheapest "
        "reasonable option is chosen, taking travel time and safety into account.",
    ),
    (
        "p",
        "Every business trip must be approved before any booking is made. Costs of trips "
        "that were not approved in advance are not reimbursed, except in emergencies "
        "such as an urgent repair of a robot at a customer site, which must be approved "
        "retroactively within 2 working days.",
    ),
    ("h1", "2. Booking Rules"),
    ("h2", "2.1 Travel Portal and Timing"),
    (
        "p",
        "All train tickets, flights, hotels and rental cars are booked through the "
        "company travel portal Voyago, which applies our negotiated rates and stores "
        "bookings for duty-of-care purposes. Trips must be booked at least 14 days before "
        "departure whenever possible; bookings made later need a short justification "
        "in the portal. Private bookings through other websites are only reimbursed if "
        "they are at least 10 percent cheaper than the best comparable Voyago offer and "
        "a screenshot of that offer is attached.",
    ),
    ("h2", "2.2 Means of Transport"),
    (
        "p",
        "Rail is the default for all trips within Germany and to neighbouring countries "
        "when the train journey takes less than 5 hours. Second class is standard; "
        "first class may be booked for journeys longer than 3 hours or if the first "
        "class fare is not more expensive. Domestic flights within Germany are not "
        "permitted.",
    ),
    (
        "p",
        "Flights are booked in economy class. For flights with a scheduled duration of "
        "more than 6 hours, premium economy may be booked. Business class requires the "
        "approval of the CFO in every case. Rental cars are limited to the compact "
        "category unless four or more employees travel together or equipment has to be "
        "transported.",
    ),
    ("h2", "2.3 Accommodation"),
    (
        "p",
        "Hotels are booked through Voyago in the standard room category. The maximum "
        "rate per night, including breakfast, is EUR 150 for cities in Germany and "
        "EUR 210 for London, Paris, Zurich, New York and San Francisco. In all other "
        "cities abroad the limit is EUR 170 per night. For stays of more than 14 nights "
        "at the same location, for example long installation projects, Finance arranges "
        "serviced apartments instead of hotels.",
    ),
    ("h1", "3. Per-Diem Allowances"),
    (
        "p",
        "Meals during business trips are covered by daily per-diem allowances instead "
        "of restaurant receipts. The full-day rate applies to every calendar day on "
        "which the traveller is away for 24 hours. The partial-day rate applies to the "
        "days of arrival and departure of multi-day trips and to one-day trips lasting "
        "more than 8 hours. One-day trips of 8 hours or less do not qualify for a "
        "per diem.",
    ),
    (
        "table",
        [
            ("Destination", "Full day (24 h)", "Partial day (> 8 h)"),
            ("Germany", "EUR 28", "EUR 14"),
            ("Netherlands", "EUR 47", "EUR 32"),
            ("Austria", "EUR 40", "EUR 27"),
            ("France", "EUR 53", "EUR 36"),
            ("United Kingdom", "EUR 52", "EUR 35"),
            ("United States", "EUR 59", "EUR 40"),
        ],
    ),
    (
        "p",
        "If meals are provided free of charge, for example by a hotel, a customer or at "
        "a conference, the per diem is reduced: by 20 percent of the full-day rate for "
        "breakfast and by 40 percent of the full-day rate each for lunch and dinner. "
        "Countries not listed above use the official German foreign per-diem rates "
        "published for the relevant year.",
    ),
    ("h1", "4. Private Car and Mileage"),
    (
        "p",
        "Using a private car for business trips is allowed only if travelling by train "
        "is not practical, for example because a customer site cannot be reached by "
        "public transport. The mileage allowance is EUR 0.30 per kilometre driven. Trips "
        "of more than 400 kilometres in total by private car require approval from the "
        "department head before departure. Parking fees and tolls are reimbursed against "
        "receipts; traffic fines and fuel costs are not reimbursed, because the mileage "
        "allowance already covers fuel.",
    ),
    (
        "p",
        "Employees who use a bicycle or e-bike for business trips within Leipzig receive "
        "EUR 0.10 per kilometre. Damage to a private car during a business trip is "
        "covered by the company's business travel insurance up to EUR 10,000, minus a "
        "deductible of EUR 300.",
    ),
    ("h1", "5. Approval Limits"),
    (
        "p",
        "The total estimated cost of a trip, including transport, accommodation and per "
        "diems, determines who must approve it:",
    ),
    ("bullet", "Up to EUR 500: the traveller's team lead."),
    ("bullet", "From EUR 500.01 to EUR 2,500: the department head."),
    ("bullet", "Above EUR 2,500: the CFO, Markus Weiland."),
    (
        "p",
        "Regardless of cost, all trips outside the European Union, all trips longer than "
        "10 working days and all trips that include a weekend stay need at least "
        "department head approval. Team leads may not approve their own trips; their "
        "trips are approved by the next level.",
    ),
    ("h1", "6. Receipts and Expense Claims"),
    (
        "p",
        "Expenses are claimed in the ExpenseFlow app, where receipts are photographed "
        "and uploaded. Original paper receipts do not need to be kept once they have "
        "been uploaded in readable form. All claims for a trip are submitted within "
        "30 calendar days after the end of the trip.",
    ),
    (
        "lines",
        [
            "Claims submitted more than 90 days after the end of a trip are no longer "
            "eligible for reimburse-",
            "ment, unless the delay was caused by the company itself. Claims that are approved by the 20th",
            "of a month are paid out with that month's salary; later approvals are paid "
            "with the next payroll",
            "run.",
        ],
    ),
    (
        "p",
        "If a receipt has been lost, the traveller may submit a signed lost-receipt "
        "declaration instead, up to a maximum of EUR 50 per item and three declarations "
        "per calendar year. Tips are reimbursed up to 10 percent of the bill and must be "
        "written on the receipt.",
    ),
    ("h1", "7. Corporate Credit Cards"),
    (
        "p",
        "Employees who travel more than four times per year receive a corporate credit "
        "card with a monthly limit of EUR 5,000. The card is for business expenses only; "
        "private use is not permitted, even if the amount is paid back later. Card "
        "transactions must be matched with receipts in ExpenseFlow by the 5th working "
        "day of the following month.",
    ),
    (
        "lines",
        [
            "Cash withdrawals with the corporate card are limited to EUR 300 per trip. Costs for the accom-",
            "modation of family members or for private extensions of a trip are always "
            "borne by the traveller",
            "and must be paid with a private card.",
        ],
    ),
    ("h1", "8. Questions"),
    (
        "p",
        "Questions about this policy are answered by the Finance travel desk at "
        "travel@northwind-robotics.example or on extension 3310, Monday to Friday from "
        "09:00 to 16:00. In an emergency during a trip, travellers can reach the 24-hour "
        "assistance service of the business travel insurer, whose number is printed on "
        "the back of the company travel card.",
    ),
]


# --------------------------------------------------------------------------
# .docx generation
# --------------------------------------------------------------------------


def _normalize_zip(data: bytes) -> bytes:
    """Rewrite a zip archive with fixed member timestamps.

    python-docx stamps each zip member with the current time, which would make
    every run produce different bytes. Member order and content are kept.
    """
    fixed = FIXED_DATE.timetuple()[:6]
    out = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(data)) as src,
        zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as dst,
    ):
        for info in src.infolist():
            member = zipfile.ZipInfo(info.filename, date_time=fixed)
            member.compress_type = zipfile.ZIP_DEFLATED
            member.external_attr = 0o644 << 16
            dst.writestr(member, src.read(info.filename))
    return out.getvalue()


def build_docx(blocks: list[Block], path: Path) -> None:
    """Write ``blocks`` to a Word document using the built-in heading styles."""
    doc = Document()
    props = doc.core_properties
    props.title = next(str(text) for kind, text in blocks if kind == "title")
    props.author = AUTHOR
    props.last_modified_by = AUTHOR
    props.subject = "Information security"
    props.keywords = "internal"
    props.comments = "Generated by docs/samples/build_binary_samples.py"
    props.created = FIXED_DATE.replace(tzinfo=None)
    props.modified = FIXED_DATE.replace(tzinfo=None)
    props.last_printed = FIXED_DATE.replace(tzinfo=None)
    props.revision = 1

    for kind, text in blocks:
        if kind == "title":
            doc.add_heading(str(text), level=0)
        elif kind == "h1":
            doc.add_heading(str(text), level=1)
        elif kind == "h2":
            doc.add_heading(str(text), level=2)
        elif kind == "p":
            doc.add_paragraph(str(text))
        elif kind == "bullet":
            doc.add_paragraph(str(text), style="List Bullet")
        else:
            raise ValueError(f"block kind {kind!r} is not supported in .docx output")

    buffer = io.BytesIO()
    doc.save(buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_normalize_zip(buffer.getvalue()))


# --------------------------------------------------------------------------
# .pdf generation
# --------------------------------------------------------------------------


class PolicyPDF(FPDF):
    """FPDF with a repeated header line and a "Page N of M" footer."""

    header_text: str = PDF_HEADER

    def header(self) -> None:
        self.set_font("Helvetica", "I", 9)
        self.set_text_color(90, 90, 90)
        self.cell(0, 6, self.header_text, align="L", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        self.set_draw_color(160, 160, 160)
        self.line(self.l_margin, self.get_y(), self.w - self.r_margin, self.get_y())
        self.ln(6)
        self.set_text_color(0, 0, 0)

    def footer(self) -> None:
        self.set_y(-15)
        self.set_font("Helvetica", "", 9)
        self.set_text_color(90, 90, 90)
        self.cell(0, 8, f"Page {self.page_no()} of {{nb}}", align="C")
        self.set_text_color(0, 0, 0)


def build_pdf(blocks: list[Block], path: Path, min_pages: int = 3) -> None:
    """Write ``blocks`` to a PDF; fails if the result has fewer than ``min_pages``."""
    pdf = PolicyPDF(orientation="P", unit="mm", format="A4")
    pdf.set_margins(left=22, top=18, right=22)
    pdf.set_auto_page_break(auto=True, margin=22)
    pdf.alias_nb_pages()  # "{nb}" in the footer becomes the total page count
    pdf.set_creation_date(FIXED_DATE)
    pdf.set_title(next(str(text) for kind, text in blocks if kind == "title"))
    pdf.set_author(AUTHOR)
    pdf.set_subject("Travel and expenses")
    pdf.set_keywords("internal")
    pdf.set_creator("docs/samples/build_binary_samples.py")
    pdf.add_page()

    body_size, line_h = 11, 5.6
    for kind, content in blocks:
        if kind == "title":
            pdf.set_font("Helvetica", "B", 18)
            pdf.multi_cell(0, 9, str(content), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
            pdf.ln(2)
        elif kind in ("h1", "h2"):
            size = 14 if kind == "h1" else 12
            pdf.ln(3 if kind == "h1" else 1)
            # Keep a heading together with at least three lines of its section.
            if pdf.get_y() + 8 + 3 * line_h > pdf.page_break_trigger:
                pdf.add_page()
            pdf.set_font("Helvetica", "B", size)
            pdf.multi_cell(0, 7, str(content), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
            pdf.ln(1)
        elif kind == "p":
            pdf.set_font("Helvetica", "", body_size)
            pdf.multi_cell(0, line_h, str(content), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
            pdf.ln(2.5)
        elif kind == "bullet":
            pdf.set_font("Helvetica", "", body_size)
            pdf.set_x(pdf.l_margin + 4)
            pdf.multi_cell(0, line_h, "- " + str(content), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
            pdf.ln(1)
        elif kind == "lines":
            # Hand-broken lines: each must fit on one line, otherwise fpdf2 would
            # re-wrap it and the intended hyphenation would move.
            pdf.set_font("Helvetica", "", body_size)
            for line in cast(Sequence[str], content):
                width = pdf.get_string_width(line)
                if width > pdf.epw:
                    raise ValueError(f"manual line too wide ({width:.1f} mm): {line!r}")
                pdf.cell(0, line_h, line, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
            pdf.ln(2.5)
        elif kind == "table":
            rows = cast(Sequence[tuple[str, ...]], content)
            widths = (66, 50, 50)
            for index, row in enumerate(rows):
                pdf.set_font("Helvetica", "B" if index == 0 else "", 10)
                for width, cell_text in zip(widths, row, strict=True):
                    pdf.cell(width, 6.5, cell_text, border=1)
                pdf.ln(6.5)
            pdf.ln(3)
        else:
            raise ValueError(f"unknown block kind {kind!r}")

    if pdf.page_no() < min_pages:
        raise RuntimeError(f"PDF has {pdf.page_no()} pages, expected at least {min_pages}")
    path.parent.mkdir(parents=True, exist_ok=True)
    pdf.output(str(path))


def main() -> None:
    """Regenerate both binary sample documents."""
    build_docx(SECURITY_POLICY, DOCX_PATH)
    build_pdf(TRAVEL_POLICY, PDF_PATH)
    for path in (DOCX_PATH, PDF_PATH):
        print(f"wrote {path.relative_to(SAMPLES_DIR)} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()

"""finemed's fixed department taxonomy: six first-level departments, internal medicine split into
sub-departments (the curriculum trains general → internal medicine → endocrinology). Classification output
is constrained to these names, so every record lands in a known department."""

from __future__ import annotations

INTERNAL_MEDICINE = "Internal medicine"
DEPARTMENTS: dict[str, tuple[str, ...]] = {
    INTERNAL_MEDICINE: ("Cardiology", "Endocrinology", "Gastroenterology", "Hematology", "Infectious disease",
                        "Nephrology", "Oncology", "Pulmonology", "Rheumatology"),
    "Surgery": (),
    "Obstetrics and gynecology": (),
    "Pediatrics": (),
    "Neurology and psychiatry": (),
    "Other": (),
}

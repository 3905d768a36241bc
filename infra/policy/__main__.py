"""Entry point Pulumi runs for ``--policy-pack infra/policy``: every rule, mandatory."""

from pulumi_policy import EnforcementLevel, PolicyPack
from rules import POLICIES

PolicyPack(name="dualtrack-guardrails", enforcement_level=EnforcementLevel.MANDATORY, policies=POLICIES)

"""AgentClinic OSCE records -> DiagGym cases (contract 1).

Modules: :mod:`.tree` (the normaliser: any hand-written JSON value -> a small tree -> exam text),
:mod:`.values` (lab value / unit / range parsing; the unit words are ``unit_words.txt``),
:mod:`.profile` (``Patient_Actor`` -> profile) and :mod:`.convert` (records -> cases, the rules).
"""

from diaggym.sources.agentclinic.convert import SOURCE, build_agentclinic_cases, classify
from diaggym.sources.agentclinic.profile import parse_age, parse_sex

__all__ = ["SOURCE", "build_agentclinic_cases", "classify", "parse_age", "parse_sex"]

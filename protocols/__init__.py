"""Pluggable protocol logic (SMPC, federated learning, dealing), sans-IO where it fits.

Imported as ``p2pgrid.protocols``: the repository keeps this folder at its top level, the
wheel installs it under ``p2pgrid`` (setup.py), and a source checkout maps it there when
``p2pgrid`` is imported. It has one name only: a second name would load every module twice,
and the wire registry refuses a message registered twice.
"""

if __name__ != "p2pgrid.protocols":
    raise ImportError(f"import p2pgrid.protocols, not {__name__}: the protocol logic installs "
                      "under p2pgrid")

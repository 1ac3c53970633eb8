"""Parity with PyCIL's DER: the side-by-side accuracy comparison (``parity.py``), the lockstep
of both trainers from one state (``parity_lockstep.py``), the fixture of PyCIL's own outputs
that tests/test_pycil_fixture.py checks (``pycil_fixture.py``), and their recorded outputs
(``results/``). Each script runs as ``python benchmarks/parity/<script>.py`` and is imported by
the tests as ``benchmarks.parity.<script>``.
"""

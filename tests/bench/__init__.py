"""Side-by-side benchmarks: `make bench` (`python -m tests.bench`).

Each figure is the portal's time divided by its anchor's (dcmtk, Orthanc) for the same work
in the same run, so a slower or busier machine slows both sides alike. Lower is better; the
targets come from the product design.
"""

"""The chaos and abuse suite: real serval clusters under real load, hurt on purpose.

Each scenario lives in one of this package's modules as a function that starts what it needs,
runs its load and its faults, prints its figures beside their goals and returns a ``Report``:

- ``faults``: replica, controller and proxy SIGKILL, a stalled or slow controller restart, a
  rolling update, all under handle and HTTP load;
- ``abuse``: malformed and smuggled HTTP, oversize heads and bodies, slowloris, half-sent
  requests, fd exhaustion, a fuzzer of raw requests, concurrent large uploads;
- ``values``: values and exceptions user code should not be able to break serval with;
- ``hosts``: the owner's SIGKILL, planted modules in the current directory, another Unix user.

The short form is this package's ``test_*.py`` (``pytest``, scaled down, the same goals
asserted); the long form is ``benchmarks/chaos/run.py``, which imports these modules. Nothing
here imports pytest outside the test files, so both can use it.
"""

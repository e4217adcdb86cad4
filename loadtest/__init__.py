"""Chargepath's open-loop load generator.

Run it as ``python -m loadtest --help``. The pure parts (the arrival schedule, the mergeable
statistics and the find-max search) import nothing that does I/O; the worker processes, the
gRPC and Redis drivers, the reports and the ceilings build on them.
"""

"""The pure core of Chargepath: domain types, plans, validation and time arithmetic.

Nothing in this package performs I/O or imports grpc, redis or generated code.
"""

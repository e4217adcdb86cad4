"""Policies used by the integration tests."""

NESTED = """
metrics: [{name: api.sms.send}, {name: slice.bytes}]
plans:
  - name: nested
    limits:
      - {name: per-tenant, metric: api.sms.send, scope: tenant,
         rate: {capacity: 10, refill: 1, per: hour}}
      - {name: per-slice, metric: api.sms.send, scope: slice,
         rate: {capacity: 6, refill: 1, per: hour}}
      - {name: per-key, metric: api.sms.send, scope: key,
         rate: {capacity: 4, refill: 1, per: hour}}
tenants:
  - {name: acme, plan: nested}
"""

REPORTING = """
metrics: [{name: slice.bytes}]
plans:
  - name: slice
    limits:
      - {name: bytes-rate, metric: slice.bytes, scope: slice,
         rate: {capacity: 1000, refill: 100, per: second}}
      - {name: bytes-hourly, metric: slice.bytes, scope: slice,
         quota: {amount: 5000, per: hour}}
      - {name: bytes-monthly, metric: slice.bytes, scope: slice,
         quota: {amount: 1000000, per: month}}
tenants:
  - {name: mvno, plan: slice, failure_policy: {mode: allow}}
  - {name: strict, plan: slice, failure_policy: {mode: deny}}
"""

HAMMER = """
metrics: [{name: api.sms.send}]
plans:
  - name: hammer
    limits:
      - {name: bucket, metric: api.sms.send, scope: tenant,
         rate: {capacity: 100, refill: 200, per: second}}
tenants:
  - {name: hot, plan: hammer}
"""

OPEN = """
metrics: [{name: api.sms.send}, {name: slice.bytes}]
plans:
  - name: big
    limits:
      - {name: sms, metric: api.sms.send, scope: key,
         rate: {capacity: 5, refill: 1, per: minute}}
      - {name: bytes, metric: slice.bytes, scope: slice,
         rate: {capacity: 1000000000, refill: 1000000000, per: second}}
tenants:
  - {name: acme, plan: big}
"""

QUOTAS = """
metrics: [{name: slice.bytes}]
plans:
  - name: quotas
    limits:
      - {name: bytes-hourly, metric: slice.bytes, scope: slice,
         quota: {amount: 5000, per: hour}}
      - {name: bytes-monthly, metric: slice.bytes, scope: slice,
         quota: {amount: 1000000, per: month}}
tenants:
  - {name: mvno, plan: quotas}
"""
